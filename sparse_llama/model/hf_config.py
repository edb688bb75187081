"""Hugging Face `config.json` <-> `LlamaConfig`.

Reads both the transformers-4 keys (`rope_theta` + `rope_scaling`, `torch_dtype`) and the
transformers-5 keys (`rope_parameters` holding `rope_theta` and `rope_type`, `dtype`), and writes
both, so that old and new transformers load what we save.

Keys missing from a config.json take transformers' `LlamaConfig` defaults (what transformers
itself would do with that file), not ours: notably `rms_norm_eps` defaults to 1e-6 there.

`eos_token_id` may be a list in Hugging Face configs (Llama-3 Instruct: end of text, end of
turn, ...). `LlamaConfig.eos_token_id` is one int: we keep the first entry. Read the full list
with `hf_eos_token_ids` and pass it to `generate.generate(eos_id=...)` to stop on any of them.
"""

from typing import Any

from sparse_llama.model.config import DTYPES, LlamaConfig, RopeScaling

# transformers' LlamaConfig defaults for optional keys.
_HF_DEFAULTS = {
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor",
                "original_max_position_embeddings")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def _first(token_id):
    if isinstance(token_id, list | tuple):
        return int(token_id[0]) if token_id else None
    return None if token_id is None else int(token_id)


def hf_eos_token_ids(config_json: dict) -> list[int]:
    """All end-of-sequence ids of a Hugging Face config (its `eos_token_id` may be a list)."""
    eos = config_json.get("eos_token_id", _HF_DEFAULTS["eos_token_id"])
    if eos is None:
        return []
    return [int(e) for e in eos] if isinstance(eos, list | tuple) else [int(eos)]


def _check_is_llama(cfg: dict, source: str) -> None:
    model_type = cfg.get("model_type")
    if model_type != "llama":
        raise ValueError(f"{source} is a {model_type!r} checkpoint; sparse_llama loads "
                         "Llama-family checkpoints only (config.json model_type 'llama')")
    archs = cfg.get("architectures")
    # A missing `architectures` is tolerated (hand-written configs); a different head is not.
    if archs is not None and "LlamaForCausalLM" not in archs:
        raise ValueError(f"{source} is a {archs} checkpoint; sparse_llama loads Llama-family "
                         "checkpoints only (architectures must include 'LlamaForCausalLM')")


def _rope_from_hf(cfg: dict, source: str) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) from `rope_parameters` (transformers 5) or `rope_scaling` (4)."""
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = float(rope.get("rope_theta", cfg.get("rope_theta", _HF_DEFAULTS["rope_theta"])))
    # Old configs (transformers < 4.43) spell the type "type".
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"{source}: rope type {rope_type!r} is not supported (supported: "
                         f"{', '.join(SUPPORTED_ROPE_TYPES)})")
    if rope_type == "default":
        return theta, None
    if "factor" not in rope:
        raise ValueError(f"{source}: rope type {rope_type!r} needs a 'factor' in its rope "
                         "parameters")
    if rope_type == "linear":
        return theta, RopeScaling(kind="linear", factor=float(rope["factor"]))
    missing = [k for k in _LLAMA3_KEYS if k not in rope]
    if missing:
        raise ValueError(f"{source}: rope type 'llama3' is missing {missing} in its rope "
                         "parameters")
    return theta, RopeScaling(
        kind="llama3", factor=float(rope["factor"]),
        low_freq_factor=float(rope["low_freq_factor"]),
        high_freq_factor=float(rope["high_freq_factor"]),
        original_max_position_embeddings=int(rope["original_max_position_embeddings"]))


def config_from_hf(config_json: dict, *, source: str = "config.json") -> LlamaConfig:
    """A `LlamaConfig` from the dict of a Hugging Face Llama `config.json`.

    `source` names the checkpoint in error messages. The checkpoint's `dtype`/`torch_dtype`
    becomes the compute dtype (as transformers' `dtype="auto"` does); anything other than
    float32/bfloat16/float16 (or absent) gives float32. Change it with `config.replace(dtype=)`.
    Raises ValueError for non-Llama checkpoints, unsupported features and missing keys.
    """
    cfg = config_json
    _check_is_llama(cfg, source)
    missing = [k for k in _REQUIRED if cfg.get(k) is None]
    if missing:
        raise ValueError(f"{source} is missing required key(s) {missing}")
    unsupported = [k for k in ("attention_bias", "mlp_bias") if cfg.get(k)]
    if unsupported:
        raise ValueError(f"{source} sets {unsupported} to true; sparse_llama's Llama has no "
                         "bias terms")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{source}: hidden_act {act!r} is not supported (only 'silu')")
    theta, scaling = _rope_from_hf(cfg, source)
    hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    head_dim = cfg.get("head_dim")
    # Normalise the implied head_dim to None so configs compare equal to our presets.
    if head_dim is not None and heads > 0 and hidden % heads == 0 and head_dim == hidden // heads:
        head_dim = None
    kv_heads = cfg.get("num_key_value_heads")
    dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    d = {k: cfg.get(k, v) for k, v in _HF_DEFAULTS.items()}
    return LlamaConfig(
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(kv_heads) if kv_heads is not None else heads,
        head_dim=None if head_dim is None else int(head_dim),
        rope_theta=theta,
        rope_scaling=scaling,
        rms_norm_eps=float(d["rms_norm_eps"]),
        max_position_embeddings=int(d["max_position_embeddings"]),
        tie_word_embeddings=bool(d["tie_word_embeddings"]),
        bos_token_id=_first(d["bos_token_id"]),
        eos_token_id=_first(d["eos_token_id"]),
        dtype=dtype if dtype in DTYPES else "float32",
    )


def config_to_hf(config: LlamaConfig, dtype: str = "float32") -> dict[str, Any]:
    """The `config.json` dict for `config`, with weights stored in `dtype`.

    Writes what transformers 5 writes (`rope_parameters`, `dtype`) plus the keys older
    versions read (`rope_theta`, `rope_scaling`, `torch_dtype`).
    """
    scaling = config.rope_scaling
    if scaling is None:
        rope_scaling = None
    elif scaling.kind == "linear":
        rope_scaling = {"rope_type": "linear", "factor": scaling.factor}
    else:
        rope_scaling = {"rope_type": "llama3", "factor": scaling.factor,
                        "low_freq_factor": scaling.low_freq_factor,
                        "high_freq_factor": scaling.high_freq_factor,
                        "original_max_position_embeddings":
                            scaling.original_max_position_embeddings}
    rope_parameters = {"rope_type": "default", **(rope_scaling or {}),
                       "rope_theta": config.rope_theta}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.dim_per_head,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "rope_theta": config.rope_theta,
        "rope_scaling": rope_scaling,
        "rope_parameters": rope_parameters,
        "dtype": dtype,
        "torch_dtype": dtype,
    }
