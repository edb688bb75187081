"""Sparse fine-tuning of a pruned model on task data (chat, instructions or text), mask kept.

    python -m launch.train --config=configs/finetune.py --config.model.hf_path=PRUNED \
        --config.data.path=TRAIN.jsonl --config.data.eval_path=HELD_OUT.jsonl --workdir=DIR

PRUNED is a `launch.prune` output (masks from PRUNED/masks) or any Hugging Face Llama whose
pruned weights are exact zeros. A JSONL whose records are `{"prompt", "response"}` or
`{"messages": [{"role", "content"}, ...]}` is chat / instruction data (docs/distill.md): it is
rendered with the tokenizer's chat template (or the plain template), trained on the response /
assistant tokens only, and without `data.eval_path` a held-out share of its conversations is
the validation set; any other data.path trains on all tokens as in configs/dense.py. Pruned
weights, their gradients and their moments stay exactly 0 (configs/sparse.py); DIR/hf is
exported with exact zeros, `masks/` and `sparsity_report.json`. This is the baseline of
configs/finetune_distill.py, which adds the dense teacher with the same data and budget.

Variants: `tiny` (default: 200 steps of 16 x 128 tokens at lr 5e-4, a few minutes on a CPU)
and `m25` (600 steps of 32 x 256 at lr 2e-4). The tiny chain from nothing:

    python -m launch.train --config=configs/dense.py:tiny --workdir=runs/dense
    python -m launch.prune --config=configs/prune.py:sparsegpt50 --config.pruning.sparsity=0.7 \
        --config.model.hf_path=runs/dense/hf --config.output_dir=runs/pruned70
    python -m launch.train --config=configs/finetune.py:tiny \
        --config.model.hf_path=runs/pruned70 --config.data.path=TASK.jsonl --workdir=runs/ft

Measured (`:tiny`, 70% SparseGPT student of configs/dense.py:tiny, 200 steps on 600k
characters of Python modules): held-out perplexity 27.72 -> 12.56 (the dense model: 10.15),
about 100 s on a loaded 2-core CPU; docs/distill.md has the distilled runs beside it.
With `--config.finetune.lora_rank=8` (and a LoRA learning rate, e.g.
`--config.optimizer.lr=2e-3`) the same run trains mask-preserving LoRA adapters instead; the
last line then also names "adapters". The last stdout line is configs/sparse.py's: {"step", "loss", "eval_perplexity" (over the
held-out response tokens for chat data), "tokens_per_s", "workdir", "hf_dir", "sparsity"}.
"""

import ml_collections

from configs import blocks

Run = blocks.Run
VARIANTS = {
    "tiny": Run(preset="tiny", seq_len=128, steps=200, batch_size=16, lr=5e-4, warmup_steps=10),
    "m25": Run(preset="m25", seq_len=256, steps=600, batch_size=32, lr=2e-4, warmup_steps=30),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = blocks.single_run(VARIANTS, arg, "tiny", "configs/finetune.py")
    config.data.validation_fraction = 0.05  # held-out conversations without data.eval_path
    # chat data: "auto" = the tokenizer's chat template if it has one, else the plain one;
    # "plain" = always the plain template (sparse_llama/data/chat.py)
    config.data.chat_template = "auto"
    config.train.eval_every = max(config.train.steps // 4, 1)
    config.train.checkpoint_every = max(config.train.steps // 2, 1)
    config.optimizer.weight_decay = 0.0  # fine-tuning: stay near the pretrained weights
    config.sparsity = blocks.sparsity(keep=True)
    # LoRA instead of full fine-tuning: finetune.lora_rank=R > 0 trains rank-R adapters of
    # every target linear with the model frozen; lora_alpha 0 = R (scale alpha / R = 1).
    # DIR/hf is the merged model (W + scale * (A B) * mask: the base's zeros exactly) and
    # DIR/adapters.safetensors the adapters alone (sparse_llama/adapters/objective.py).
    config.finetune = blocks.finetune()
    return config
