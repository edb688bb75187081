"""`launch.generate`: complete a text prompt with a model directory, from a config."""

import time

import ml_collections

from sparse_llama.data.tokenizer import load_tokenizer
from sparse_llama.model import generate, loading


def check_generate_config(config: ml_collections.ConfigDict) -> None:
    loading.check_model_section(config.model)
    loading.require_hf_path(config.model)
    if config.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be positive, got {config.max_new_tokens}")
    if config.temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {config.temperature}")
    if not 0 < config.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {config.top_p}")


def run(config: ml_collections.ConfigDict) -> dict:
    check_generate_config(config)
    tokenizer = load_tokenizer(config.model.hf_path)
    prompt = tokenizer.encode(config.prompt)
    if config.add_bos and tokenizer.bos_id is not None:
        prompt = [tokenizer.bos_id, *prompt]
    if not prompt:
        raise ValueError("the prompt is empty after tokenization; pass --config.prompt=TEXT")
    bundle = loading.load_model(config.model)
    start = time.time()
    # A single prompt comes back as a list already cut after its EOS.
    out = generate.generate(bundle.params, bundle.config, prompt,
                            max_new_tokens=config.max_new_tokens,
                            temperature=config.temperature, top_p=config.top_p,
                            seed=config.seed, eos_id=tokenizer.eos_id)
    tokens = [int(t) for t in out]
    seconds = time.time() - start
    return {"text": tokenizer.decode(tokens), "tokens": tokens, "prompt_tokens": len(prompt),
            "seconds": round(seconds, 3),
            "tokens_per_s": round(len(tokens) / max(seconds, 1e-9), 2)}
