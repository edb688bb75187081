"""Perplexity of a Hugging Face Llama directory on a text file (wikitext-style windows).

    python -m launch.eval --config=configs/eval.py \
        --config.model.hf_path=DIR --config.data.eval_path=FILE --config.data.seq_len=2048

A text file is tokenized once with the model's tokenizer, cut into non-overlapping windows of
seq_len tokens (no BOS inserted), and exp(mean NLL) is reported. A .jsonl / .parquet file or
folder (the `data.text_field` of each record) or a folder of text files is read as documents
by the training sources; each is framed `[BOS] text [EOS]` as in training and they are joined
in order before the same windowing (sparse_llama/commands/eval.py). float32 by default
(`--config.model.dtype=bfloat16` to change it). Cost: one forward per window; a 7B model at
seq_len 2048 over wikitext-2 test (~340k tokens, 166 windows) takes minutes on one GPU.
Expected: Llama-2-7B gives 5.12 at seq_len 4096 (docs/algorithms.md, "Perplexity protocol").
Last stdout line: {"perplexity": ..., "tokens": ..., ...}.
"""

import ml_collections

from configs import blocks


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    config = ml_collections.ConfigDict()
    config.model = blocks.model()
    # '' dense; 'bitmask' or '2:4': the pruned weights packed for the sparse kernels
    # (GPU/TPU Pallas kernels, the jnp reference on CPU; docs/kernels.md).
    config.model.packed = ""
    # a soft prompt (configs/soft_prompt.py's soft_prompt.safetensors) before every input
    config.model.soft_prompt = ""
    # auto: W8A8 when the checkpoint is compressed-tensors int8; w8a8: always (round-to-nearest
    # scales for a float checkpoint); none: float weights (docs/quantization.md)
    config.model.quantized = "auto"
    config.mesh = blocks.mesh()
    # Only what eval reads (blocks.data's training keys would be accepted and ignored).
    config.data = ml_collections.ConfigDict({
        "eval_path": "",  # a text file, or .jsonl / .parquet documents (file or folder)
        "seq_len": 2048,
        "tokenizer_path": "",  # default: the model's own tokenizer (model.hf_path)
        "text_field": "text",  # jsonl key / parquet column holding each document
    })
    config.eval = ml_collections.ConfigDict({"batch_size": 8})
    return config
