"""Quantize a (sparse) model directory (configs/quantize.py says how)."""

from sparse_llama.commands import launching
from sparse_llama.commands import quantize as run

_CONFIG = launching.define_config("configs/quantize.py")

if __name__ == "__main__":
    launching.run_command(_CONFIG, run.run)
