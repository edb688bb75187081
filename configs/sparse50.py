"""The 50% sparse foundational Llama recipe of arXiv 2405.03594 (configs/sparse70.py without
its last two stages).

    python -m launch.train --config=configs/sparse50.py --config.model.hf_path=LLAMA2_7B --workdir=DIR
    python -m launch.train --config=configs/sparse50.py:tiny --workdir=DIR      # CPU, minutes

Stages: `dense` (only without model.hf_path), `prune50` (SparseGPT one-shot to 50%, calibration
from the training mixture), `sparse50` (sparse pretraining with the mask kept; 45B tokens at full
size), `eval_final`, `export`. Keys, variants and the last stdout line as configs/sparse70.py.
"""

import ml_collections

from configs import sparse70

VARIANTS = sparse70.VARIANTS  # the same sizes


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return sparse70.build(arg or "full", 0.5)
