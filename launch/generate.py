"""Complete a prompt with a model directory (configs/generate.py says how)."""

from sparse_llama.commands import generate as completion
from sparse_llama.commands import launching

_CONFIG = launching.define_config("configs/generate.py")

if __name__ == "__main__":
    launching.run_command(_CONFIG, completion.run)
