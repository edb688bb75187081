"""Sparsity-accelerated supervised fine-tuning (SAT, arXiv 2406.01392; docs/sat.md).

    python -m launch.train --config=configs/sat_sft.py --config.model.hf_path=HF_DIR \
        --config.data.path=TRAIN.jsonl --config.data.eval_path=HELD_OUT.jsonl --workdir=DIR

TRAIN.jsonl holds `{"prompt", "response"}` or `{"messages": [...]}` records (chat data,
sparse_llama/data/chat.py): rendered with the tokenizer's chat template (or the plain one),
trained on the response / assistant tokens only; without `data.eval_path` a held-out share of
the conversations is the validation set. SAT as in configs/sat_cpt.py (`sat.*` keys,
`blocks.sat`): each step keeps the scored top / sampled `1 - rate` of the MLP
channels (and KV groups with `sat.head_rate`), the ladder returns to dense for the tail, and
evaluation is dense. Dense baseline of the same run: `--config.train.objective=lm`.

Variants: `tiny` (default: 200 steps of 16 x 128 tokens at lr 5e-4 from `model.hf_path` or,
without one, the tiny preset; a few minutes on a CPU) and `m25` (600 steps of 32 x 256 at lr
2e-4). The last stdout line is configs/dense.py's, `eval_perplexity` over the held-out
response tokens.
"""

import ml_collections

from configs import blocks, finetune

VARIANTS = finetune.VARIANTS  # the same runs


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """configs/finetune.py's chat fine-tuning (variants, data, optimizer) with SAT, dense."""
    config = finetune.get_config(arg)
    config.sparsity.keep = False  # SAT's SFT fine-tunes a dense model (set True on a sparse one)
    config.train.objective = "sat"
    config.sat = blocks.sat()
    return config
