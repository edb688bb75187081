"""Train into a workdir, resuming when it holds a checkpoint: one run (configs/dense.py,
sparse.py) or, for a config with `stages`, a staged recipe (configs/sparse70.py, spdf.py)."""

from absl import flags

from sparse_llama.commands import launching, recipe
from sparse_llama.commands import train as train_command

_CONFIG = launching.define_config("configs/dense.py")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, hf export.")


def _train(config) -> dict:
    if not _WORKDIR.value:
        raise ValueError("--workdir is required (checkpoints, metrics and the export go there)")
    if "stages" in config:
        return recipe.run(config, _WORKDIR.value)
    return train_command.train(config, _WORKDIR.value)


if __name__ == "__main__":
    launching.run_command(_CONFIG, _train)
