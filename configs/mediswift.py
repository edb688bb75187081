"""MediSwift: sparse pretraining on a domain corpus, dense fine-tuning, then a soft prompt.

    python -m launch.train --config=configs/mediswift.py:tiny --workdir=DIR
    python -m launch.train --config=configs/mediswift.py:tiny \
        --config.data.path=DOMAIN_CORPUS --config.data.eval_path=HELD_OUT.txt \
        --config.dense_finetune.data_path=TASK --config.prompt.data_path=TASK --workdir=DIR

Stages (sparse_llama/recipes/stages.py; each in DIR/<stage>/, resumable), configs/spdf.py's
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

import ml_collections

from configs import blocks, spdf

# variant -> soft prompt tokens (budget), lr, warmup
_PROMPT = {"tiny": (307_200, 3e-2, 10), "m25": (3_276_800, 3e-2, 20)}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "tiny"
    if variant not in _PROMPT:
        raise ValueError(f"unknown variant {variant!r} of configs/mediswift.py; choose one of "
                         f"{sorted(_PROMPT)}")
    config = spdf.get_config(variant)
    tokens, lr, warmup = _PROMPT[variant]
    config.prompt = blocks.soft_prompt_stage(
        tokens, lr=lr, batch_size=config.dense_finetune.train.batch_size, warmup_steps=warmup)
    config.stages = ("sparse_pretrain", "dense_finetune", "prompt")
    del config["eval_final"]  # every stage is measured; the prompt stage is the last word
    return config
