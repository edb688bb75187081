"""Perplexity of a Hugging Face Llama directory on a text file (wikitext-style windows).

    python -m launch.eval --config=configs/eval.py \
        --config.model.hf_path=DIR --config.data.eval_path=FILE --config.data.seq_len=2048

The text is tokenized once with the model's tokenizer, cut into non-overlapping windows of
seq_len tokens (no BOS inserted), and exp(mean NLL) is reported. float32 by default
(`--config.model.dtype=bfloat16` to change it). Cost: one forward per window; a 7B model at
seq_len 2048 over wikitext-2 test (~340k tokens, 166 windows) takes minutes on one GPU.
Expected: Llama-2-7B gives 5.12 at seq_len 4096 (REFERENCES.md section 3).
Last stdout line: {"perplexity": ..., "tokens": ..., ...}.
"""

import ml_collections

from configs import blocks


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    config = ml_collections.ConfigDict()
    config.model = blocks.model()
    config.mesh = blocks.mesh()
    config.data = blocks.data(seq_len=2048)
    config.eval = ml_collections.ConfigDict({"batch_size": 8})
    return config
