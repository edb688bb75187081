"""Dense (pre)training of a Llama preset on the embedded corpus (or any text with data.path).

    python -m launch.train --config=configs/dense.py:tiny --workdir=DIR

Variants: `tiny` (default; preset tiny: d=64, 2 layers, vocab from the embedded 512-id BPE),
`m25` (preset m25: 24.6M params, 4096-id BPE; about an hour on a 2-core CPU),
`small` (preset small, 8192-id BPE), `m100` (preset m100; an accelerator run).
Overrides: `--config.train.steps=...`, `--config.model.hf_path=DIR --config.data.path=FILE`
(continue training a Hugging Face model on a text file), `--config.model.dtype=bfloat16`.
The run resumes from DIR/checkpoints when it holds one and exports DIR/hf at the end.

Measured (tiny, default settings: 1200 steps of 16 x 128 tokens = 2.5M tokens, one CPU
device): about 70 s wall on a shared 2-core laptop-class CPU (~40k tokens/s; the first run
also tokenizes the embedded corpus once, ~10 s, cached after), validation perplexity 20.6 on
8 x 16 x 128 held-out tokens of the embedded corpus, against 202 for the unigram distribution
of the same 512-token BPE (train loss 2.64). The curve: 43.1 at step 200, 28.2 at 400, 24.8
at 600, 22.5 at 800, 21.3 at 1000, 20.6 at 1200 (globally shuffled windows; with the former
128-row shuffle buffer it was 73, 46, 31, 26, 24, 22). Bit-exact on rerun (same seed).
The last stdout line is {"step", "loss", "eval_perplexity", "tokens_per_s", "workdir", ...}.
"""

import ml_collections

from configs import blocks

Run = blocks.Run
VARIANTS = {
    "tiny": Run(preset="tiny", seq_len=128, steps=1200, batch_size=16, lr=3e-3, warmup_steps=30),
    "m25": Run(preset="m25", seq_len=256, steps=3000, batch_size=32, lr=1e-3, warmup_steps=100),
    "small": Run(preset="small", seq_len=256, steps=2000, batch_size=32, lr=1e-3,
                 warmup_steps=100),
    "m100": Run(preset="m100", seq_len=1024, steps=20000, batch_size=64, lr=6e-4,
                warmup_steps=1000),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return blocks.single_run(VARIANTS, arg, "tiny", "configs/dense.py")
