"""Perplexity of a model on a text file (configs/eval.py says how)."""

from sparse_llama import launching
from sparse_llama.eval import run

_CONFIG = launching.define_config("configs/eval.py")

if __name__ == "__main__":
    launching.run_command(_CONFIG, run.run)
