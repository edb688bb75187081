"""Cost of distillation: the distillation step against the student's plain step plus one
teacher forward (CPU, float32).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/distill.py [tiny|m25 ...]

Same model shape for student and teacher, same batch, one device. The student is the
teacher with 70% of every q/k/v/o/gate/up/down entry zeroed at random and the keep-sparse
optimizer (`make_optimizer(..., sparse=True)`); the plain step is the `lm` objective, the
distillation step `sparse_llama/distill/objective.py`'s loss (CE + KD + SquareHead, the
teacher an input of the step). The teacher forward is `llama.forward(...,
return_hidden=True)` jitted alone. Ideal: distill_ms ~= plain_ms + teacher_ms (the KD and
SquareHead terms are elementwise work on logits and hidden states already computed);
`overhead` = distill_ms / (plain_ms + teacher_ms). Each callable reports its fastest step
(benchmarks/train_step.py's `fastest`). The last stdout line is {"benchmark": "distill",
"rows": [...]}.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from peak_report import emit
from train_step import fastest, make_batch

from configs import blocks
from sparse_llama.distill.objective import distill_loss
from sparse_llama.ground.tree_paths import path_name
from sparse_llama.model import llama
from sparse_llama.model.config import preset
from sparse_llama.optim.factory import make_optimizer
from sparse_llama.sparsity import masks as masks_lib
from sparse_llama.train import state as state_lib
from sparse_llama.train.objective import Objective
from sparse_llama.train.step import make_train_step

CONFIGS = {"tiny": (preset("tiny"), 16, 128), "m25": (preset("m25"), 8, 256)}
SPARSITY = 0.7


def bench(name: str) -> dict:
    config, batch_size, seq_len = CONFIGS[name]
    teacher = llama.init_params(jax.random.key(0), config)
    rng = np.random.default_rng(0)
    masks = jax.tree_util.tree_map_with_path(
        lambda path, w: (jnp.asarray(rng.random(w.shape) >= SPARSITY)
                         if masks_lib.is_target(path_name(path))
                         else jnp.ones((), jnp.bool_)), teacher)
    student = masks_lib.apply_masks(teacher, masks)
    batch = jax.tree.map(jnp.asarray, make_batch(config, batch_size, seq_len))
    optimizer, schedule = make_optimizer(blocks.optimizer(lr=1e-4), total_steps=1000,
                                         sparse=True)
    objective = Objective(loss=distill_loss(config, config, ce_weight=1.0, kd_weight=1.0,
                                            layer_weight=1.0, temperature=2.0),
                          inputs=teacher)
    steps = {"plain": (make_train_step(config, optimizer, schedule), ()),
             "distill": (make_train_step(config, optimizer, schedule, objective=objective),
                         (teacher,))}
    holders = {k: {"state": state_lib.create(jax.tree.map(jnp.copy, student), optimizer, 0)}
               for k in steps}

    def runner(kind):
        step, extra = steps[kind]

        def run():
            holders[kind]["state"], metrics = step(holders[kind]["state"], batch, *extra)
            float(metrics["loss"])
        return run

    forward = jax.jit(llama.forward, static_argnames=("config", "return_hidden"))

    def teacher_forward():
        jax.block_until_ready(forward(teacher, batch["inputs"], config=config,
                                      positions=batch["positions"],
                                      segment_ids=batch["segment_ids"], return_hidden=True))

    plain_s, teacher_s, distill_s = fastest([runner("plain"), teacher_forward,
                                             runner("distill")])
    return {"config": name, "params_m": round(llama.count_params(teacher) / 1e6, 1),
            "batch": batch_size, "seq_len": seq_len, "plain_ms": round(plain_s * 1e3, 2),
            "teacher_fwd_ms": round(teacher_s * 1e3, 2),
            "distill_ms": round(distill_s * 1e3, 2),
            "overhead": round(distill_s / (plain_s + teacher_s), 3)}


def main():
    names = sys.argv[1:] or ["tiny"]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"error: unknown config(s) {unknown}; choose from {sorted(CONFIGS)}")
    rows = [bench(name) for name in names]
    print(f"threads={os.cpu_count()}  devices={jax.devices()}  sparsity={SPARSITY}")
    emit("distill", rows, ["config", "params_m", "batch", "seq_len", "plain_ms",
                           "teacher_fwd_ms", "distill_ms", "overhead"], sparsity=SPARSITY)


if __name__ == "__main__":
    main()
