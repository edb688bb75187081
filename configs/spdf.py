"""SPDF (arXiv 2303.10464): sparse pretraining, then dense fine-tuning with the mask released.

    python -m launch.train --config=configs/spdf.py:tiny --workdir=DIR
    python -m launch.train --config=configs/spdf.py:tiny_prune --config.model.hf_path=DENSE --workdir=DIR

Stages (sparse_llama/recipes/stages.py; each in DIR/<stage>/, resumable):
- `tiny` / `m25`: `sparse_pretrain` from scratch with a static unstructured mask chosen at
  initialisation (`sparse_pretrain.mask_init` = random | magnitude, `mask_sparsity` 0.75 as the
  paper's highest setting), the mask kept exactly; `dense_finetune` with the mask released:
  every weight trains, the pruned ones starting from 0 with fresh (zero) AdamW moments;
  `eval_final`.
- `tiny_prune`: `prune` (SparseGPT one-shot of model.hf_path to 75%), then the same two stages
  (the sparse stage keeps the pruned mask).
The fine-tuning data is the recipe's unless `--config.dense_finetune.data_path=FILE`; every
stage is measured on `data.eval_path` (or the embedded corpus's held-out text). SPDF reports
2.5x fewer pretraining FLOPs at 75% on GPT-3 XL with a small downstream loss (docs/recipes.md).
Last stdout line: {"stages": [{"name", "sparsity", "perplexity", "tokens", "seconds"}, ...],
"hf_dir", "workdir"}.
"""

import ml_collections

from configs import blocks

# variant -> preset, seq_len, batch, sparse tokens, dense tokens, sparse lr, dense lr, warmup
_VARIANTS = {
    "tiny": ("tiny", 128, 16, 1_638_400, 409_600, 3e-3, 1e-3, 30),
    "tiny_prune": ("tiny", 128, 16, 409_600, 409_600, 1e-3, 1e-3, 20),
    "m25": ("m25", 256, 32, 49_152_000, 8_192_000, 1e-3, 3e-4, 100),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "tiny"
    if variant not in _VARIANTS:
        raise ValueError(f"unknown variant {variant!r} of configs/spdf.py; choose one of "
                         f"{sorted(_VARIANTS)}")
    preset, seq_len, batch, sparse_tokens, dense_tokens, sparse_lr, dense_lr, warmup = (
        _VARIANTS[variant])
    config = ml_collections.ConfigDict()
    config.model = blocks.model(preset)
    config.mesh = blocks.mesh()
    config.data = blocks.data(seq_len=seq_len)
    config.eval = blocks.recipe_eval(seq_len, max_chars=200_000)
    config.sparse_pretrain = blocks.train_stage(sparse_tokens, lr=sparse_lr, batch_size=batch,
                                                warmup_steps=warmup, sparse=True)
    config.dense_finetune = blocks.train_stage(dense_tokens, lr=dense_lr, batch_size=batch,
                                               warmup_steps=warmup, sparse=False)
    config.dense_finetune.release = True  # the point of SPDF: the zeros may train now
    config.eval_final = ml_collections.ConfigDict({"kind": "eval"})
    stages = ["sparse_pretrain", "dense_finetune", "eval_final"]
    if variant == "tiny_prune":
        config.prune = blocks.prune_stage(0.75, num_samples=32, seq_len=seq_len)
        stages.insert(0, "prune")
    else:
        config.sparse_pretrain.mask_init = "random"
        config.sparse_pretrain.mask_sparsity = 0.75
    config.stages = tuple(stages)
    return config
