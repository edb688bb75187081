"""Cost of keeping a mask: the dense train step next to the keep-sparse one (CPU, float32).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/keep_sparse.py

Both sides are `sparse_llama.train.step.make_train_step` on one device with the same model,
the same params (50% of every q/k/v/o/gate/up/down entry zeroed at random, unstructured) and
the same batch; the only difference is `make_optimizer(..., sparse=False)` against
`sparse=True` (the whole clipping + AdamW chain wrapped in `optim/keep_sparse.py`, masks from
the zeros). The sparse step does the dense step's work plus two `jnp.where` per targeted
tensor, so its cost is the masking overhead: speedup = dense step time / sparse step time
(target >= 0.95). The update-only columns time the optimizer update and `apply_updates` alone
(no forward/backward), where the same overhead is a larger share.

After a compile/warm-up step the two alternate in blocks (the same background load for both)
and each reports its fastest step; on a shared CPU the median mostly measures the other
processes. The last stdout line is {"benchmark": "keep_sparse", "rows": [...]}.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from peak_report import emit
from train_step import fastest, make_batch

from configs import blocks
from sparse_llama.ground.tree_paths import path_name
from sparse_llama.model import llama
from sparse_llama.model.config import LlamaConfig, preset
from sparse_llama.optim.factory import make_optimizer
from sparse_llama.sparsity import masks as masks_lib
from sparse_llama.train import state as state_lib
from sparse_llama.train.step import make_train_step

# config -> (model, batch, seq_len), as benchmarks/train_step.py.
CONFIGS = {
    "tiny": (preset("tiny"), 16, 128),
    "m25": (preset("m25"), 8, 256),
}
SPARSITY = 0.5


def sparse_params(config: LlamaConfig) -> dict:
    """Random init with SPARSITY of every targeted tensor set to exactly 0 (unstructured)."""
    params = llama.init_params(jax.random.key(0), config)
    rng = np.random.default_rng(0)
    masks = jax.tree_util.tree_map_with_path(
        lambda path, w: (jnp.asarray(rng.random(w.shape) >= SPARSITY)
                         if masks_lib.is_target(path_name(path))
                         else jnp.ones((), jnp.bool_)), params)
    return masks_lib.apply_masks(params, masks)


def runner(config: LlamaConfig, params: dict, batch: dict, opt_cfg, sparse: bool):
    """(one train step as a callable, one optimizer update as a callable, {"state": ...})."""
    optimizer, schedule = make_optimizer(opt_cfg, total_steps=1000, sparse=sparse)
    step = make_train_step(config, optimizer, schedule)
    holder = {"state": state_lib.create(jax.tree.map(jnp.copy, params), optimizer, seed=0)}
    device_batch = jax.tree.map(jnp.asarray, batch)

    def run_step():
        holder["state"], metrics = step(holder["state"], device_batch)
        float(metrics["loss"])  # blocks until the step is done

    # The update alone, on fixed gradients; donating like the step so memory traffic matches.
    def update_fn(params, opt_state, grads):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    update = jax.jit(update_fn, donate_argnums=(0, 1))
    grads = jax.tree.map(lambda w: jnp.full(w.shape, 1e-3, w.dtype), params)
    upd = {"params": jax.tree.map(jnp.copy, params)}
    upd["opt_state"] = optimizer.init(upd["params"])

    def run_update():
        upd["params"], upd["opt_state"] = update(upd["params"], upd["opt_state"], grads)
        jax.block_until_ready(upd["params"])

    return run_step, run_update, holder


def pruned_nonzero(params: dict, reference: dict) -> int:
    """How many entries that are 0 in `reference`'s targeted tensors are nonzero in `params`."""
    count = 0
    for (path, w), r in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                            jax.tree.leaves(reference), strict=True):
        if masks_lib.is_target(path_name(path)):
            count += int(np.count_nonzero(np.asarray(w)[np.asarray(r) == 0]))
    return count


def bench(name: str) -> dict:
    config, batch_size, seq_len = CONFIGS[name]
    params = sparse_params(config)
    batch = make_batch(config, batch_size, seq_len)
    opt_cfg = blocks.optimizer(lr=1e-3)
    dense_step, dense_update, _ = runner(config, params, batch, opt_cfg, sparse=False)
    sparse_step, sparse_update, sparse_state = runner(config, params, batch, opt_cfg,
                                                      sparse=True)
    dense_s, sparse_s = fastest([dense_step, sparse_step])
    dense_u, sparse_u = fastest([dense_update, sparse_update], steps=8)
    return {"config": name, "params_m": round(llama.count_params(params) / 1e6, 1),
            "batch": batch_size, "seq_len": seq_len,
            "dense_step_ms": round(dense_s * 1e3, 2), "sparse_step_ms": round(sparse_s * 1e3, 2),
            "speedup": round(dense_s / sparse_s, 3),
            "dense_update_ms": round(dense_u * 1e3, 3),
            "sparse_update_ms": round(sparse_u * 1e3, 3),
            "update_speedup": round(dense_u / sparse_u, 3),
            # After every timed sparse step: must be 0.
            "pruned_nonzero": pruned_nonzero(sparse_state["state"].params, params)}


def main():
    threads = os.cpu_count() or 1
    rows = [bench(name) for name in CONFIGS]
    print(f"threads={threads}  devices={jax.devices()}  sparsity={SPARSITY}")
    emit("keep_sparse", rows, ["config", "params_m", "batch", "seq_len", "dense_step_ms",
                               "sparse_step_ms", "speedup", "dense_update_ms",
                               "sparse_update_ms", "update_speedup", "pruned_nonzero"],
         threads=threads, sparsity=SPARSITY)


if __name__ == "__main__":
    main()
