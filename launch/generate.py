"""Complete a prompt: `python -m launch.generate --config=configs/generate.py ...`."""

from absl import app
from ml_collections import config_flags

from sparse_llama import launching
from sparse_llama.model import completion

_CONFIG = config_flags.DEFINE_config_file("config", "configs/generate.py", "Generation config.")


def main(argv):
    del argv
    launching.main(lambda: completion.run(_CONFIG.value))


if __name__ == "__main__":
    app.run(main)
