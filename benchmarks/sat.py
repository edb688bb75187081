"""Step time of sparsity-accelerated training (SAT) against the dense step, same model and
batch, one run.

    python benchmarks/sat.py [--configs=m25,m100] [--metric=maxip] [--rounds=3 --steps=3]

For each config: the dense train step (AdamW, `lm` objective) and the SAT step at MLP rates
r in {0.25, 0.5, 0.75}, alone and with the same head rate (KV groups), selection `sampling`,
scores from 1/8 of the batch's rows (configs/sat_cpt.py defaults). speedup = dense step time
/ SAT step time (scoring, selection, gathers and the frozen-unit bookkeeping included);
ideal_speedup = 1 / (1 - (2/3) r - (1/3) r_h) (docs/sat.md, "Speed": the matmul FLOPs of a
block; embeddings, lm_head and attention scores are not reduced, so the whole-model ideal is
lower: model_ideal_speedup counts every matmul of the step, from
`config.matmul_flops_per_token` with the kept widths); scoring_fraction = time of the scoring + selection alone / dense step time. Steps
alternate between the programs and each reports its fastest step (a shared CPU's median
measures the other processes). The last stdout line is {"benchmark": "sat", "rows": [...]}.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from peak_report import emit
from train_step import fastest

from configs import blocks
from sparse_llama.model import llama
from sparse_llama.model.config import LlamaConfig, matmul_flops_per_token, preset
from sparse_llama.optim.factory import make_optimizer
from sparse_llama.sat import objective as sat_objective
from sparse_llama.sat import schedule
from sparse_llama.train import state as state_lib
from sparse_llama.train.step import make_train_step

# config -> (model, batch, seq_len)
CONFIGS = {
    "tiny": (preset("tiny"), 16, 128),
    "m25": (preset("m25"), 8, 256),
    "m100": (preset("m100"), 4, 512),
}
RATES = (0.25, 0.5, 0.75)


def make_batch(config: LlamaConfig, batch: int, seq_len: int) -> dict:
    x = np.random.default_rng(0).integers(0, config.vocab_size, (batch, seq_len + 1))
    return jax.tree.map(jnp.asarray, {
        "inputs": x[:, :-1].astype(np.int32), "targets": x[:, 1:].astype(np.int32),
        "segment_ids": np.ones((batch, seq_len), np.int32),
        "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)),
        "loss_mask": np.ones((batch, seq_len), np.float32)})


def model_ideal(model: LlamaConfig, seq_len: int, r: float, r_h: float) -> float:
    """Dense / SAT matmul FLOPs of the whole model (lm_head and attention scores included)."""
    kf = schedule.kept_count(r, model.intermediate_size)
    kg = schedule.kept_count(r_h, model.num_kv_heads)
    sat = model.replace(intermediate_size=kf, num_kv_heads=kg,
                        num_heads=kg * (model.num_heads // model.num_kv_heads),
                        head_dim=model.dim_per_head)
    return (matmul_flops_per_token(model, seq_len) / matmul_flops_per_token(sat, seq_len))


def runner(step, state, batch):
    holder = {"state": state}

    def run():
        holder["state"], metrics = step(holder["state"], batch)
        float(metrics["loss"])  # blocks until done
    return run


def bench(name: str, metric: str, rounds: int = 3, steps: int = 3) -> list[dict]:
    model, batch_size, seq_len = CONFIGS[name]
    params = llama.init_params(jax.random.key(0), model)
    batch = make_batch(model, batch_size, seq_len)
    opt_cfg = blocks.optimizer(lr=1e-4)
    base, schedule = make_optimizer(opt_cfg, total_steps=1000)
    fns = [runner(make_train_step(model, base, schedule),
                  state_lib.create(jax.tree.map(jnp.copy, params), base, seed=0), batch)]
    settings, scorers = [], []
    for r in RATES:
        for r_h in (0.0, r):
            sat = blocks.sat(r, r_h)
            sat.metric = metric
            sat.lors.constant_fraction = 1.0
            try:
                plan = sat_objective.make_plan(sat, model, 1000)
            except ValueError:  # a head rate that is not whole KV groups of this model
                continue
            objective = sat_objective.objective_from_plan(plan, model)
            opt = objective.transform(base)
            state = state_lib.create(jax.tree.map(jnp.copy, params), opt, seed=0)
            fns.append(runner(make_train_step(model, opt, schedule, objective=objective),
                              state, batch))
            settings.append((r, r_h))
            if r_h == 0.0 and r == RATES[0]:
                score = jax.jit(lambda p, b, k, plan=plan: sat_objective.select_units(
                    plan, model, p, b, k, 0))
                key = jax.random.key(1)
                scorers.append(lambda score=score, key=key: jax.block_until_ready(
                    score(params, batch, key)))
    times = fastest(fns + scorers, rounds=rounds, steps=steps)
    dense_s, sat_s, score_s = times[0], times[1:1 + len(settings)], times[-1]
    rows = []
    for (r, r_h), s in zip(settings, sat_s, strict=True):
        ideal = 1.0 / (1.0 - 2.0 / 3.0 * r - 1.0 / 3.0 * r_h)
        rows.append({"config": name, "batch": batch_size, "seq_len": seq_len,
                     "metric": metric, "mlp_rate": r, "head_rate": r_h,
                     "dense_step_s": round(dense_s, 4), "sat_step_s": round(s, 4),
                     "speedup": round(dense_s / s, 3), "ideal_speedup": round(ideal, 3),
                     "model_ideal_speedup": round(model_ideal(model, seq_len, r, r_h), 3),
                     "of_ideal": round(dense_s / s / ideal, 3),
                     "scoring_fraction": round(score_s / dense_s, 3)})
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", default="m25")
    parser.add_argument("--metric", default="maxip")
    parser.add_argument("--rounds", type=int, default=3, help="alternation rounds")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    args = parser.parse_args()
    rows = [row for name in args.configs.split(",")
            for row in bench(name, args.metric, args.rounds, args.steps)]
    emit("sat", rows, ["config", "metric", "mlp_rate", "head_rate", "dense_step_s",
                       "sat_step_s", "speedup", "ideal_speedup", "model_ideal_speedup",
                       "of_ideal",
                       "scoring_fraction"], devices=str(jax.devices()))


if __name__ == "__main__":
    main()
