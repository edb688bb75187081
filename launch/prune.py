"""One-shot pruning of a model directory (configs/prune.py says how). A config with a `quant`
section (configs/prune.py:w8a8) prunes and quantizes in one calibration pass: launch.quantize's
command runs it."""

from sparse_llama.commands import launching, prune, quantize

_CONFIG = launching.define_config("configs/prune.py")


def _run(config) -> dict:
    return (quantize.run if "quant" in config else prune.run)(config)


if __name__ == "__main__":
    launching.run_command(_CONFIG, _run)
