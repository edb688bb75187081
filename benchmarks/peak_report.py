"""What the model benchmarks share: this CPU's matmul peak and the table + JSON line."""

import json
import time

import jax
import jax.numpy as jnp


def matmul_peak(shapes) -> float:
    """FLOP/s of the fastest plain jitted `jnp.dot` among (m, k, n) shapes: the practical
    matmul peak that peak_fraction is measured against (fastest of 20 calls each)."""
    dot = jax.jit(jnp.dot)
    best = 0.0
    for m, k, n in shapes:
        a, b = jnp.ones((m, k), jnp.float32), jnp.ones((k, n), jnp.float32)
        dot(a, b).block_until_ready()
        seconds = float("inf")
        for _ in range(20):
            start = time.perf_counter()
            dot(a, b).block_until_ready()
            seconds = min(seconds, time.perf_counter() - start)
        best = max(best, 2 * m * k * n / seconds)
    return best


def emit(name: str, rows: list[dict], columns: list[str], **meta) -> None:
    """Print the rows as a table, then the benchmark's JSON line last on stdout."""
    print(" | ".join(columns))
    for row in rows:
        print(" | ".join(str(row[c]) for c in columns))
    print(json.dumps({"benchmark": name, **meta, "rows": rows}))
