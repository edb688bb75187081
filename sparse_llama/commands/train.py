"""`launch.train` for one run (configs/dense.py, sparse.py, finetune*.py, sat_*.py): the
training loop with the objective the registry names (`train.objective`). A config with
`stages` is a recipe (commands/recipe.py), which runs its training stages through here."""

import ml_collections

from sparse_llama import objectives
from sparse_llama.train import loop
from sparse_llama.train.checkpoint import StopRequest


def train(config: ml_collections.ConfigDict, workdir: str, *,
          stop: StopRequest | None = None) -> dict:
    """Train `config` into `workdir` (resuming there); the run summary (train/loop.py)."""
    return loop.train(config, workdir, build_objective=objectives.build, stop=stop)
