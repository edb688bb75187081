"""One-shot pruning of a model directory (configs/prune.py says how)."""

from sparse_llama import launching
from sparse_llama.pruning import run

_CONFIG = launching.define_config("configs/prune.py")

if __name__ == "__main__":
    launching.run_command(_CONFIG, run.run)
