"""Complete a prompt with a Hugging Face Llama directory (KV cache; greedy by default).

    python -m launch.generate --config=configs/generate.py \
        --config.model.hf_path=DIR --config.prompt="def fibonacci(n):" --config.max_new_tokens=64

Sampling: --config.temperature=0.8 --config.top_p=0.95 --config.seed=1. The prompt is prefilled
once, then one token per step until max_new_tokens or the tokenizer's EOS.
Last stdout line: {"text": completion only, "tokens": completion token ids, ...}.
"""

import ml_collections

from configs import blocks


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    config = ml_collections.ConfigDict()
    config.model = blocks.model()
    config.prompt = ""
    config.add_bos = True  # prepend the tokenizer's BOS, as Llama chat/base models expect
    config.max_new_tokens = 32
    config.temperature = 0.0  # 0: greedy
    config.top_p = 1.0
    config.seed = 0
    return config
