"""Sparsity-accelerated continual pretraining (SAT, arXiv 2406.01392; docs/sat.md).

    python -m launch.train --config=configs/sat_cpt.py --config.model.hf_path=HF_DIR \
        --config.data.path=TEXT --workdir=DIR
    python -m launch.train --config=configs/sat_cpt.py:tiny --workdir=DIR      # no download

Each step scores the MLP channels (and, with `sat.head_rate`, the KV groups) of every block in
`sat.layers` on a subsample of the batch, keeps the top or a sampled `1 - rate` of them and
runs forward and backward over the kept units only (smaller dense matmuls); omitted units are
left untouched that step (`sat.freeze_omitted`). LORS (`sat.lors.*`) holds the rates for
`constant_fraction` of `train.steps`, then steps them down in `rungs` equal rungs to dense;
each rung compiles its own step once (logged). Evaluation is dense. Keys `train.*`,
`optimizer.*`, `data.*` as configs/dense.py, plus `sat.*` (`blocks.sat`); set
`--config.train.objective=lm` for the dense baseline of the same run.

Variants: `tiny` (default: preset tiny from scratch, or `--config.model.hf_path=` a small HF
dir; 300 steps of 16 x 128 tokens, about a minute on a 2-core CPU) and `m25` (1000 steps of
32 x 256). Measured (docs/sat.md, "Quality"): on the tiny model continued from prose onto
code, mlp_rate 0.5 with the ladder ends ~11% above the dense run's validation perplexity for
the same steps (the issue's 3% target is not met at this scale). The last stdout line is configs/dense.py's
{"step", "loss", "eval_perplexity" (dense), "tokens_per_s", "workdir", "hf_dir"};
metrics.jsonl logs `sat_mlp_rate` / `sat_head_rate` of every step.
"""

import ml_collections

from configs import blocks

Run = blocks.Run
VARIANTS = {
    "tiny": Run(preset="tiny", seq_len=128, steps=300, batch_size=16, lr=1e-3, warmup_steps=20),
    "m25": Run(preset="m25", seq_len=256, steps=1000, batch_size=32, lr=3e-4, warmup_steps=50),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = blocks.single_run(VARIANTS, arg, "tiny", "configs/sat_cpt.py")
    config.train.objective = "sat"
    config.train.eval_every = max(config.train.steps // 3, 1)
    config.sat = blocks.sat()
    return config
