"""Train into a workdir, resuming when it holds a checkpoint: one run (configs/dense.py,
sparse.py) or, for a config with `stages`, a staged recipe (configs/sparse70.py, spdf.py)."""

from absl import flags

from sparse_llama import launching
from sparse_llama.recipes import stages
from sparse_llama.train import loop

_CONFIG = launching.define_config("configs/dense.py")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, hf export.")


def _train(config) -> dict:
    if not _WORKDIR.value:
        raise ValueError("--workdir is required (checkpoints, metrics and the export go there)")
    if "stages" in config:
        return stages.run(config, _WORKDIR.value)
    return loop.train(config, _WORKDIR.value)


if __name__ == "__main__":
    launching.run_command(_CONFIG, _train)
