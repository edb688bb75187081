"""Dense `jnp.dot` against our packed sparse matmul for Llama-2-7B layer shapes.

    python benchmarks/sparse_matmul.py            # the issue's table (bf16, 18 rows)
    python benchmarks/sparse_matmul.py --quick    # quarter-size shapes, 2 repeats (CPU smoke)

Rows: (in, out) = 4096x4096 (q/k/v/o_proj), 11008x4096 (down_proj), 4096x11008 (gate/up_proj)
x sparsity 50% and 70% (bitmask, uniform random mask) and 2:4 (2:4 format) x batch 1 and 16.
`byte_limit` is the memory-bound ceiling of the format (docs/algorithms.md, "Decode limits": dense bf16
bytes over (1 - s) * 2 + 1/8 for bitmask, 1 + 1/8 for 2:4); `packed_ratio` is dense bytes over
the bytes our pack really reads (tile padding included). The kernel is picked by backend
(gpu / tpu Pallas kernels); on CPU the pure-jnp reference runs, and the output says so: CPU
numbers measure that reference, not a kernel. Two `seam` rows check that a dense weight
through model/linear.py compiles to the same program as a bare `x @ w` and runs as fast.
Last stdout line: {"benchmark": "sparse_matmul", "rows": [...]}.
"""

import argparse
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from peak_report import emit

from sparse_llama import kernels
from sparse_llama.kernels.ops import default_kernel
from sparse_llama.model.linear import linear

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
SPARSITIES = ["50%", "70%", "2:4"]
BATCHES = [1, 16]


def median_time(fn, args, repeats: int) -> float:
    fn(*args).block_until_ready()  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args).block_until_ready()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def sparse_weight(shape, sparsity: str, dtype, rng) -> jax.Array:
    w = rng.standard_normal(shape, np.float32)
    if sparsity == "2:4":
        g = w.reshape(shape[0] // 4, 4, shape[1])
        g[np.argsort(rng.random(g.shape, np.float32), axis=1) >= 2] = 0
    else:
        w[rng.random(shape, np.float32) < float(sparsity.rstrip("%")) / 100] = 0
    return jnp.asarray(w, dtype)


def byte_limit(sparsity: str, itemsize: int) -> float:
    kept = 0.5 if sparsity == "2:4" else 1 - float(sparsity.rstrip("%")) / 100
    return itemsize / (kept * itemsize + 1 / 8)


def bench_row(shape, sparsity, batch, dtype, repeats, rng) -> dict:
    w = sparse_weight(shape, sparsity, dtype, rng)
    p = kernels.pack(w, "2:4" if sparsity == "2:4" else "bitmask")
    x = jnp.asarray(rng.standard_normal((batch, shape[0]), np.float32), dtype)
    dense = jax.jit(jnp.dot)
    ours = jax.jit(kernels.matmul)
    dense_s = median_time(dense, (x, w), repeats)
    ours_s = median_time(ours, (x, p), repeats)
    err = float(jnp.max(jnp.abs(ours(x, p).astype(jnp.float32) - dense(x, w).astype(jnp.float32))))
    itemsize = jnp.dtype(dtype).itemsize
    return {"in": shape[0], "out": shape[1], "sparsity": sparsity, "batch": batch,
            "dense_ms": round(dense_s * 1e3, 3), "ours_ms": round(ours_s * 1e3, 3),
            "speedup": round(dense_s / ours_s, 3),
            "byte_limit": round(byte_limit(sparsity, itemsize), 2),
            "packed_ratio": round(shape[0] * shape[1] * itemsize / p.nbytes, 2),
            "max_abs_diff": err}


def compiled_program(fn, *args) -> list[str]:
    """The optimised HLO instructions without names and source metadata (which name the
    Python function)."""
    lines = fn.lower(*args).compile().as_text().splitlines()
    instructions = [ln for ln in lines if re.match(r"\s*(ROOT )?%?[\w.-]+ = ", ln)]
    return [re.sub(r", metadata=\{[^}]*\}|jit_\w+|jit\(\w+\)|, stack_frame_id=\d+", "", ln)
            for ln in instructions]


def seam_rows(shape, dtype, repeats, rng) -> list[dict]:
    """Dense weight: bare `x @ w` against `linear(x, w)` (same HLO expected, same speed)."""
    w = jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
    rows = []
    for batch in BATCHES:
        x = jnp.asarray(rng.standard_normal((batch, shape[0]), np.float32), dtype)
        bare, seam = jax.jit(lambda x, w: x @ w), jax.jit(linear)
        same = compiled_program(bare, x, w) == compiled_program(seam, x, w)
        bare_s, seam_s = median_time(bare, (x, w), repeats), median_time(seam, (x, w), repeats)
        rows.append({"in": shape[0], "out": shape[1], "sparsity": "seam", "batch": batch,
                     "dense_ms": round(bare_s * 1e3, 3), "ours_ms": round(seam_s * 1e3, 3),
                     "speedup": round(bare_s / seam_s, 3), "byte_limit": 1.0,
                     "packed_ratio": 1.0, "max_abs_diff": 0.0, "same_program": bool(same)})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="quarter-size shapes and 2 repeats (a short CPU run)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per row")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args()
    shapes = [(i // 4, o // 4) for i, o in SHAPES] if args.quick else SHAPES
    repeats = args.repeats or (2 if args.quick else 10)
    dtype = jnp.dtype(args.dtype)
    kernel = default_kernel()
    mode = (f"backend={jax.default_backend()} kernel={kernel}"
            + (" (CPU: the pure-jnp reference runs, no Pallas kernel; not a kernel speed)"
               if kernel == "reference" else ""))
    print(mode)
    rng = np.random.default_rng(0)
    rows = [bench_row(s, sp, b, dtype, repeats, rng)
            for s in shapes for sp in SPARSITIES for b in BATCHES]
    rows += seam_rows(shapes[0], dtype, repeats, rng)
    emit("sparse_matmul", rows, ["in", "out", "sparsity", "batch", "dense_ms", "ours_ms",
                                 "speedup", "byte_limit", "packed_ratio", "max_abs_diff"],
         backend=jax.default_backend(), kernel=kernel, dtype=args.dtype, quick=args.quick,
         repeats=repeats)


if __name__ == "__main__":
    main()
