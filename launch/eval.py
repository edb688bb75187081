"""Perplexity of a model on a text file (configs/eval.py says how)."""

from sparse_llama.commands import eval as run
from sparse_llama.commands import launching

_CONFIG = launching.define_config("configs/eval.py")

if __name__ == "__main__":
    launching.run_command(_CONFIG, run.run)
