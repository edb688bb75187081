"""Resolve the `model` config section into a LlamaConfig and params (preset or HF directory)."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import ml_collections

from sparse_llama.model import llama
from sparse_llama.model.config import DTYPES, REMAT_POLICIES, LlamaConfig, preset


@dataclasses.dataclass(frozen=True)
class ModelBundle:
    config: LlamaConfig
    params: dict
    tokenizer_dir: str | None  # the HF directory when it holds a tokenizer


def check_model_section(model_cfg: ml_collections.ConfigDict) -> None:
    """Validate the `model` section before anything is loaded."""
    for key in ("dtype", "param_dtype"):
        if model_cfg[key] not in DTYPES:
            raise ValueError(f"model.{key}={model_cfg[key]!r} is not supported; use one of "
                             f"{DTYPES}")
    if model_cfg.remat and model_cfg.remat not in REMAT_POLICIES:
        raise ValueError(f"model.remat={model_cfg.remat!r} is not one of {REMAT_POLICIES}")
    if model_cfg.scan_layers not in (-1, 0, 1):
        raise ValueError(f"model.scan_layers must be -1 (preset default), 0 or 1, got "
                         f"{model_cfg.scan_layers}")
    if model_cfg.hf_path:
        if not os.path.isdir(model_cfg.hf_path):
            raise FileNotFoundError(f"model.hf_path={model_cfg.hf_path!r} is not a directory; "
                                    "point it at a Hugging Face Llama checkpoint directory")
    else:
        preset(model_cfg.preset)  # raises with the list of presets


def require_hf_path(model_cfg: ml_collections.ConfigDict) -> None:
    """For commands that need a real checkpoint (and its tokenizer), not a preset."""
    if not model_cfg.hf_path:
        raise ValueError("model.hf_path is empty; pass --config.model.hf_path=DIR (a Hugging "
                         "Face Llama directory with its tokenizer)")


def apply_overrides(config: LlamaConfig, model_cfg: ml_collections.ConfigDict) -> LlamaConfig:
    """Execution settings from the run config on top of the architecture."""
    changes = {"dtype": model_cfg.dtype}
    if model_cfg.scan_layers != -1:
        changes["scan_layers"] = bool(model_cfg.scan_layers)
    if model_cfg.remat:
        changes["remat"] = model_cfg.remat
    return config.replace(**changes)


def model_config(model_cfg: ml_collections.ConfigDict, *, vocab_size: int | None = None
                 ) -> LlamaConfig:
    """The LlamaConfig the section describes, without loading any weights."""
    check_model_section(model_cfg)
    if model_cfg.hf_path:
        from sparse_llama.model import hf_config

        config_path = os.path.join(model_cfg.hf_path, "config.json")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"{model_cfg.hf_path} has no config.json; model.hf_path "
                                    "must be a Hugging Face model directory")
        with open(config_path) as f:
            base = hf_config.config_from_hf(json.load(f), source=config_path)
    else:
        base = preset(model_cfg.preset)
        if vocab_size is not None:
            base = base.replace(vocab_size=vocab_size)
    return apply_overrides(base, model_cfg)


def load_model(model_cfg: ml_collections.ConfigDict, *, key: jax.Array | None = None,
               vocab_size: int | None = None) -> ModelBundle:
    """Params from `model.hf_path`, or freshly initialised from `model.preset` with `key`.

    `vocab_size` resizes a preset's vocabulary (training from scratch with a new tokenizer).
    """
    config = model_config(model_cfg, vocab_size=vocab_size)
    param_dtype = jnp.dtype(model_cfg.param_dtype)
    if model_cfg.hf_path:
        from sparse_llama.model import hf_io

        _, params = hf_io.load_hf(model_cfg.hf_path, param_dtype=param_dtype)
        has_tok = os.path.exists(os.path.join(model_cfg.hf_path, "tokenizer.json"))
        return ModelBundle(config, params, model_cfg.hf_path if has_tok else None)
    key = jax.random.key(0) if key is None else key
    return ModelBundle(config, llama.init_params(key, config, param_dtype), None)
