"""Sparse continued pretraining of a pruned model: its mask is kept exactly.

    python -m launch.train --config=configs/sparse.py --config.model.hf_path=PRUNED --workdir=DIR

PRUNED is a `launch.prune` output (the masks come from PRUNED/masks) or any Hugging Face Llama
whose pruned weights are exact zeros (the mask is then read from those zeros; the log says
which). Pruned weights, their gradients and their AdamW moments stay exactly 0 for the whole
run (sparse_llama/optim/keep_sparse.py); DIR/hf is exported with exact zeros, `masks/` and
`sparsity_report.json`. The keys are those of configs/dense.py (`train.*`, `optimizer.*`,
`data.*`, e.g. `--config.data.path=FILE --config.data.eval_path=FILE`) plus `sparsity.*`
(configs/blocks.py): `sparsity.masks_path` names other masks.

Variants: `tiny` (default: 300 steps of 16 x 128 tokens at lr 1e-3, minutes on a CPU) and
`m25` (1000 steps of 32 x 256 at lr 3e-4). Cost: a dense run's, plus under 5% for the mask
(benchmarks/keep_sparse.py). The last stdout line is configs/dense.py's plus "sparsity".
"""

import dataclasses

import ml_collections

from configs import blocks, dense


@dataclasses.dataclass(frozen=True, kw_only=True)
class Continued:
    """A configs/dense.py variant continued sparse: its model and data, these steps and lr."""

    dense: str  # the configs/dense.py variant
    steps: int
    lr: float
    warmup_steps: int


VARIANTS = {
    "tiny": Continued(dense="tiny", steps=300, lr=1e-3, warmup_steps=20),
    "m25": Continued(dense="m25", steps=1000, lr=3e-4, warmup_steps=50),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    run = blocks.pick(VARIANTS, arg, "tiny", "configs/sparse.py")
    config = dense.get_config(run.dense)
    config.train.steps = run.steps
    config.train.eval_every = max(run.steps // 3, 1)
    config.train.checkpoint_every = max(run.steps // 3, 1)
    config.optimizer.lr = run.lr
    config.optimizer.warmup_steps = run.warmup_steps
    config.sparsity = blocks.sparsity(keep=True)
    return config
