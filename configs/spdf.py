"""SPDF (arXiv 2303.10464): sparse pretraining, then dense fine-tuning with the mask released.

    python -m launch.train --config=configs/spdf.py:tiny --workdir=DIR
    python -m launch.train --config=configs/spdf.py:tiny_prune --config.model.hf_path=DENSE --workdir=DIR

Stages (sparse_llama/commands/recipe.py; each in DIR/<stage>/, resumable):
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

import dataclasses

import ml_collections

from configs import blocks


@dataclasses.dataclass(frozen=True, kw_only=True)
class Recipe:
    """One SPDF variant: sparse pretraining, then dense fine-tuning, on the same batches."""

    preset: str
    seq_len: int
    batch: int  # global sequences per update, both stages
    sparse_tokens: float  # sparse_pretrain budget
    dense_tokens: float  # dense_finetune budget
    sparse_lr: float
    dense_lr: float
    warmup_steps: int  # both stages
    prune: bool  # start with SparseGPT of model.hf_path, not a random mask at initialisation


VARIANTS = {
    "tiny": Recipe(preset="tiny", seq_len=128, batch=16, sparse_tokens=1_638_400,
                   dense_tokens=409_600, sparse_lr=3e-3, dense_lr=1e-3, warmup_steps=30,
                   prune=False),
    "tiny_prune": Recipe(preset="tiny", seq_len=128, batch=16, sparse_tokens=409_600,
                         dense_tokens=409_600, sparse_lr=1e-3, dense_lr=1e-3, warmup_steps=20,
                         prune=True),
    "m25": Recipe(preset="m25", seq_len=256, batch=32, sparse_tokens=49_152_000,
                  dense_tokens=8_192_000, sparse_lr=1e-3, dense_lr=3e-4, warmup_steps=100,
                  prune=False),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    r = blocks.pick(VARIANTS, arg, "tiny", "configs/spdf.py")
    config = ml_collections.ConfigDict()
    config.model = blocks.model(r.preset)
    config.mesh = blocks.mesh()
    config.data = blocks.data(seq_len=r.seq_len)
    config.eval = blocks.recipe_eval(r.seq_len, max_chars=200_000)
    config.sparse_pretrain = blocks.train_stage(r.sparse_tokens, lr=r.sparse_lr,
                                                batch_size=r.batch,
                                                warmup_steps=r.warmup_steps, sparse=True)
    config.dense_finetune = blocks.train_stage(r.dense_tokens, lr=r.dense_lr,
                                               batch_size=r.batch,
                                               warmup_steps=r.warmup_steps, sparse=False)
    config.dense_finetune.release = True  # the point of SPDF: the zeros may train now
    config.eval_final = ml_collections.ConfigDict({"kind": "eval"})
    stages = ["sparse_pretrain", "dense_finetune", "eval_final"]
    if r.prune:
        config.prune = blocks.prune_stage(0.75, num_samples=32, seq_len=r.seq_len)
        stages.insert(0, "prune")
    else:
        config.sparse_pretrain.mask_init = "random"
        config.sparse_pretrain.mask_sparsity = 0.75
    config.stages = tuple(stages)
    return config
