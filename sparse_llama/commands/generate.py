"""`launch.generate`: complete a text prompt with a model directory, from a config.

The prompt is encoded as transformers encodes it, with the tokenizer's own post-processor
(`tokenizer.json`), which adds BOS for Llama-2/3 tokenizers and nothing for others;
`add_bos=True/False` overrides that. Generation stops at any id of `generation_config.json`'s
`eos_token_id` (else config.json's; Llama-3-Instruct lists end-of-text and end-of-turn), and
at the tokenizer's own EOS, the token our training appends to every document.
"""

import json
import os
import time

import ml_collections

from sparse_llama import loading
from sparse_llama.data.tokenizer import check_vocab, load_tokenizer
from sparse_llama.model import generate, hf_config, soft_prompt


def check_generate_config(config: ml_collections.ConfigDict) -> None:
    loading.check_model_section(config.model)
    loading.require_hf_path(config.model)
    if config.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be positive, got {config.max_new_tokens}")
    if config.temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {config.temperature}")
    if not 0 < config.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {config.top_p}")
    if config.add_bos not in (None, True, False):
        raise ValueError(f"add_bos must be unset (the tokenizer decides), True or False, got "
                         f"{config.add_bos!r}")


def encode_prompt(tokenizer, prompt: str, add_bos: bool | None = None) -> list[int]:
    """Token ids of `prompt` with the tokenizer's special tokens, as transformers' `tok(prompt)`.

    add_bos: None keeps what the tokenizer's post-processor does; True makes the ids start with
    BOS (added once), False removes a leading BOS the post-processor put there.
    """
    ids = tokenizer.backend.encode(prompt, add_special_tokens=True).ids
    bos = tokenizer.bos_id
    if add_bos is True:
        if bos is None:
            raise ValueError("add_bos=True, but the tokenizer has no BOS token; leave add_bos "
                             "unset")
        if not ids or ids[0] != bos:
            ids = [bos, *ids]
    elif add_bos is False and ids and bos is not None and ids[0] == bos:
        ids = ids[1:]
    return ids


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    return data if isinstance(data, dict) else {}


def stop_token_ids(model_dir: str, tokenizer) -> list[int]:
    """Every end-of-sequence id generation stops at (see the module docstring), sorted."""
    ids = []
    for name in ("generation_config.json", "config.json"):
        path = os.path.join(model_dir, name)
        if os.path.isfile(path):
            found = _read_json(path)
            if "eos_token_id" in found or name == "config.json":
                ids = hf_config.hf_eos_token_ids(found)
                break
    return sorted({*ids, tokenizer.eos_id})


def run(config: ml_collections.ConfigDict) -> dict:
    check_generate_config(config)
    model = loading.model_config(config.model)
    tokenizer = load_tokenizer(config.model.hf_path)
    check_vocab(tokenizer, model.vocab_size)
    soft = soft_prompt.from_model_section(config.model, model)
    prompt = encode_prompt(tokenizer, config.prompt, config.add_bos)
    if not prompt:
        raise ValueError("the prompt is empty after tokenization; pass --config.prompt=TEXT")
    stop_ids = stop_token_ids(config.model.hf_path, tokenizer)
    bundle = loading.load_model(config.model)
    start = time.time()
    # A single prompt comes back as a list already cut after its EOS.
    out = generate.generate(bundle.params, bundle.config, prompt,
                            max_new_tokens=config.max_new_tokens,
                            temperature=config.temperature, top_p=config.top_p,
                            seed=config.seed, eos_id=stop_ids, soft_prompt=soft)
    tokens = [int(t) for t in out]
    seconds = time.time() - start
    return {"text": tokenizer.decode(tokens), "tokens": tokens, "prompt_tokens": len(prompt),
            "packed": config.model.get("packed") or None,
            "soft_prompt": config.model.get("soft_prompt") or None, "seconds": round(seconds, 3),
            "tokens_per_s": round(len(tokens) / max(seconds, 1e-9), 2)}
