"""Sparsity-accelerated supervised fine-tuning (SAT, arXiv 2406.01392; docs/sat.md).

    python -m launch.train --config=configs/sat_sft.py --config.model.hf_path=HF_DIR \
        --config.data.path=TRAIN.jsonl --config.data.eval_path=HELD_OUT.jsonl --workdir=DIR

TRAIN.jsonl holds `{"prompt", "response"}` or `{"messages": [...]}` records (chat data,
sparse_llama/data/chat.py): rendered with the tokenizer's chat template (or the plain one),
trained on the response / assistant tokens only; without `data.eval_path` a held-out share of
the conversations is the validation set. SAT as in configs/sat_cpt.py (`sat.*` keys,
`sat_cpt.sat_section`): each step keeps the scored top / sampled `1 - rate` of the MLP
channels (and KV groups with `sat.head_rate`), the ladder returns to dense for the tail, and
evaluation is dense. Dense baseline of the same run: `--config.train.objective=lm`.

Variants: `tiny` (default: 200 steps of 16 x 128 tokens at lr 5e-4 from `model.hf_path` or,
without one, the tiny preset; a few minutes on a CPU) and `m25` (600 steps of 32 x 256 at lr
2e-4). The last stdout line is configs/dense.py's, `eval_perplexity` over the held-out
response tokens.
"""

import ml_collections

from configs import blocks, sat_cpt

_VARIANTS = {
    # preset, seq_len, steps, batch, lr, warmup
    "tiny": ("tiny", 128, 200, 16, 5e-4, 10),
    "m25": ("m25", 256, 600, 32, 2e-4, 30),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "tiny"
    if variant not in _VARIANTS:
        raise ValueError(f"unknown variant {variant!r} of configs/sat_sft.py; choose one of "
                         f"{sorted(_VARIANTS)}")
    preset, seq_len, steps, batch, lr, warmup = _VARIANTS[variant]
    config = ml_collections.ConfigDict()
    config.model = blocks.model(preset)
    config.mesh = blocks.mesh()
    config.data = blocks.data(seq_len=seq_len)
    config.data.validation_fraction = 0.05  # held-out conversations without data.eval_path
    config.train = blocks.train(steps=steps, batch_size=batch)
    config.train.objective = "sat"
    config.train.eval_every = max(steps // 4, 1)
    config.train.checkpoint_every = max(steps // 2, 1)
    config.optimizer = blocks.optimizer(lr=lr)
    config.optimizer.warmup_steps = warmup
    config.optimizer.weight_decay = 0.0  # fine-tuning: stay near the pretrained weights
    config.sat = sat_cpt.sat_section()
    return config
