"""Export the newest checkpoint of a training workdir as a Hugging Face directory.

    python -m launch.export --workdir=DIR [--out_dir=DIR/hf]

No --config: the checkpoint carries the model, optimizer and mesh settings it was saved with.
"""

from absl import flags

from sparse_llama.commands import export, launching

_WORKDIR = flags.DEFINE_string("workdir", None, "Training run directory (with checkpoints/).")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Where to write the export (default WORKDIR/hf).")


def _main(argv):
    def run() -> dict:
        if not _WORKDIR.value:
            raise ValueError("--workdir is required")
        return export.export_workdir(_WORKDIR.value, _OUT_DIR.value)

    launching.main(run)


if __name__ == "__main__":
    launching.run_app(_main)
