"""`launch.export`: the newest intact checkpoint of a training workdir as a Hugging Face
directory (train/export.py), refusing workdirs whose objective trains something other than
the model (its registration says so, sparse_llama/objectives.py)."""

from sparse_llama import objectives
from sparse_llama.train import export


def export_workdir(workdir: str, out_dir: str | None = None) -> dict:
    """{"hf_dir", "step", ...} of the export (default `<workdir>/hf`)."""
    return export.export_latest(workdir, out_dir, held_instead=objectives.trains_the_model)
