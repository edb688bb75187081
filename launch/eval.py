"""Perplexity of a model on a text file: `python -m launch.eval --config=configs/eval.py ...`."""

from absl import app
from ml_collections import config_flags

from sparse_llama import launching
from sparse_llama.eval import run

_CONFIG = config_flags.DEFINE_config_file("config", "configs/eval.py", "Evaluation config.")


def main(argv):
    del argv
    launching.main(lambda: run.run(_CONFIG.value))


if __name__ == "__main__":
    app.run(main)
