"""Complete a prompt with a Hugging Face Llama directory (KV cache; greedy by default).

    python -m launch.generate --config=configs/generate.py \
        --config.model.hf_path=DIR --config.prompt="def fibonacci(n):" --config.max_new_tokens=64

Sampling: --config.temperature=0.8 --config.top_p=0.95 --config.seed=1. The prompt is encoded
as transformers encodes it (the tokenizer's post-processor decides about BOS;
--config.add_bos=True/False overrides), prefilled once, then one token per step until
max_new_tokens or any EOS id of generation_config.json (else config.json) or the tokenizer's.
Last stdout line: {"text": completion only, "tokens": completion token ids, ...}.
"""

import ml_collections
from ml_collections import config_dict

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
    config.prompt = ""
    # Unset: the tokenizer's post-processor decides (as transformers' `tok(prompt)`); True /
    # False force a leading BOS on or off.
    config.add_bos = config_dict.placeholder(bool)
    config.max_new_tokens = 32
    config.temperature = 0.0  # 0: greedy
    config.top_p = 1.0
    config.seed = 0
    return config
