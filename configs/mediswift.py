"""MediSwift: sparse pretraining on a domain corpus, dense fine-tuning, then a soft prompt.

    python -m launch.train --config=configs/mediswift.py:tiny --workdir=DIR
    python -m launch.train --config=configs/mediswift.py:tiny \
        --config.data.path=DOMAIN_CORPUS --config.data.eval_path=HELD_OUT.txt \
        --config.dense_finetune.data_path=TASK --config.prompt.data_path=TASK --workdir=DIR

Stages (sparse_llama/commands/recipe.py; each in DIR/<stage>/, resumable), configs/spdf.py's
two plus one:
- `sparse_pretrain`: from scratch with a static random unstructured mask of
  `sparse_pretrain.mask_sparsity` (0.75; MediSwift trains at 50% and 75%), kept exactly;
- `dense_finetune`: every weight released and trained (on `dense_finetune.data_path`, default
  the recipe's data);
- `prompt`: `prompt.soft_prompt.num_tokens` (20) virtual tokens learned in front of every
  input of the frozen fine-tuned model (configs/soft_prompt.py's objective; on
  `prompt.data_path`, default the recipe's data), written to
  DIR/prompt/soft_prompt.safetensors; its record's perplexity is measured with the prompt.
Data: `data.path` is the domain corpus (default: the embedded text + code mixture, so the tiny
variant runs from nothing); every stage is measured on `data.eval_path` (or that mixture's
held-out text). MediSwift reports 2-2.5x fewer training FLOPs at 50-75% sparsity on biomedical
text (docs/recipes.md). `tiny` takes about ten minutes on a 2-core CPU; `m25` is sized for
one accelerator. Last stdout line: {"stages": [{"name", "sparsity", "perplexity", "tokens",
"seconds"}, ...], "hf_dir" (the fine-tuned model), "workdir"}.
"""

import dataclasses

import ml_collections

from configs import blocks, spdf


@dataclasses.dataclass(frozen=True, kw_only=True)
class Prompt:
    """The soft-prompt stage after configs/spdf.py's variant of the same name."""

    tokens: float  # token budget
    lr: float
    warmup_steps: int


VARIANTS = {
    "tiny": Prompt(tokens=307_200, lr=3e-2, warmup_steps=10),
    "m25": Prompt(tokens=3_276_800, lr=3e-2, warmup_steps=20),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "tiny"
    prompt = blocks.pick(VARIANTS, variant, "tiny", "configs/mediswift.py")
    config = spdf.get_config(variant)
    config.prompt = blocks.soft_prompt_stage(
        prompt.tokens, lr=prompt.lr, batch_size=config.dense_finetune.train.batch_size,
        warmup_steps=prompt.warmup_steps)
    config.stages = ("sparse_pretrain", "dense_finetune", "prompt")
    del config["eval_final"]  # every stage is measured; the prompt stage is the last word
    return config
