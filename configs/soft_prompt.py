"""Soft prompting (MediSwift): learn N virtual token embeddings in front of every input of a
frozen model, on a domain's text or task data.

    python -m launch.train --config=configs/soft_prompt.py --config.model.hf_path=MODEL \
        --config.data.path=DOMAIN --workdir=DIR

Only the prompt trains (N x hidden_size numbers; the model and its masks are frozen inputs of
the step): `soft_prompt.num_tokens` (default 20) embeddings, initialised from the embeddings
of `soft_prompt.init_text` (tiled or cut to N tokens) or, when empty, from N random vocabulary
rows. Every document of a packed row sees the whole prompt and its own tokens, at rotary
positions shifted by N (sparse_llama/model/soft_prompt.py). Data keys are configs/dense.py's
(text or chat/instruction JSONL as in configs/finetune.py). The run writes
DIR/soft_prompt.safetensors, which `launch.eval` and `launch.generate` take as
`--config.model.soft_prompt=FILE`.

Variants: `tiny` (default: 150 steps of 16 x 128 tokens at lr 3e-2, a couple of minutes on a
CPU) and `m25` (400 steps of 32 x 256). Prompt tuning wants a far larger learning rate than
weight training: the prompt is a few thousand numbers that start as ordinary embeddings.
Last stdout line: {"step", "loss", "eval_perplexity" (with the prompt, held-out data),
"tokens_per_s", "workdir", "soft_prompt"}.
"""

import ml_collections

from configs import blocks

Run = blocks.Run
VARIANTS = {
    "tiny": Run(preset="tiny", seq_len=128, steps=150, batch_size=16, lr=3e-2, warmup_steps=10),
    "m25": Run(preset="m25", seq_len=256, steps=400, batch_size=32, lr=3e-2, warmup_steps=20),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = blocks.single_run(VARIANTS, arg, "tiny", "configs/soft_prompt.py")
    config.train.objective = "soft_prompt"
    config.train.eval_every = max(config.train.steps // 3, 1)
    config.train.checkpoint_every = max(config.train.steps // 2, 1)
    config.optimizer.weight_decay = 0.0  # the prompt is not a weight to shrink
    config.optimizer.clip_norm = 1.0
    config.data.validation_fraction = 0.05
    config.data.chat_template = "auto"
    config.soft_prompt = blocks.soft_prompt()
    return config
