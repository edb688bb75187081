"""Resolve the `model` config section into a LlamaConfig and params (preset or HF directory).

It sits above the model, the packed kernels and the quantization code: what a section names
(`model.packed`, `model.quantized`, a compressed-tensors checkpoint) is dispatched here, so
none of those layers imports another to load a model."""

import dataclasses
import json
import os
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from sparse_llama.kernels import serving
from sparse_llama.model import hf_config, hf_io, llama
from sparse_llama.model.config import (
    ATTENTION_IMPLEMENTATIONS,
    DTYPES,
    REMAT_POLICIES,
    LlamaConfig,
    preset,
)
from sparse_llama.quant import compressed_tensors, w8a8

# model.quantized: none (float weights; a quantized checkpoint is dequantized) | auto (W8A8
# when the checkpoint is compressed-tensors int8) | w8a8 (always; docs/quantization.md)
QUANTIZED = ("none", "auto", "w8a8")


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
    attention = model_cfg.get("attention")
    if attention and attention not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"model.attention={attention!r} is not one of "
                         f"{ATTENTION_IMPLEMENTATIONS}")
    # Splash is a Pallas TPU kernel: elsewhere only its (slow) interpreter runs it, which the
    # tests use and a run should not.
    if attention == "splash" and jax.default_backend() != "tpu":
        raise ValueError(f"model.attention=splash runs on TPU only (this backend is "
                         f"{jax.default_backend()}); use model.attention=xla (CPU) or jax (GPU)")
    if model_cfg.scan_layers not in (-1, 0, 1):
        raise ValueError(f"model.scan_layers must be -1 (preset default), 0 or 1, got "
                         f"{model_cfg.scan_layers}")
    if model_cfg.hf_path:
        if not os.path.isdir(model_cfg.hf_path):
            raise FileNotFoundError(f"model.hf_path={model_cfg.hf_path!r} is not a directory; "
                                    "point it at a Hugging Face Llama checkpoint directory")
    else:
        preset(model_cfg.preset)  # raises with the list of presets
    if model_cfg.get("packed"):
        serving.check_packed_option(model_cfg.packed)
    quantized = model_cfg.get("quantized", "none")
    if quantized not in QUANTIZED:
        raise ValueError(f"model.quantized={quantized!r} is not one of {QUANTIZED} (auto: what "
                         "the checkpoint's quantization_config says)")
    # auto only quantizes an int8 checkpoint; serving.pack_params refuses that one at load time
    if quantized == "w8a8" and model_cfg.get("packed"):
        raise ValueError("model.packed and model.quantized: the packed sparse kernels take "
                         "float weights; set model.quantized=none, or leave model.packed empty")


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
    if model_cfg.get("attention"):
        changes["attention"] = model_cfg.attention
    return config.replace(**changes)


def model_config(model_cfg: ml_collections.ConfigDict, *, vocab_size: int | None = None
                 ) -> LlamaConfig:
    """The LlamaConfig the section describes, without loading any weights."""
    check_model_section(model_cfg)
    if model_cfg.hf_path:
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
    """Params from `model.hf_path`, or freshly initialised from `model.preset` with `key`,
    then rewritten by the section's weight transforms (`WEIGHT_TRANSFORMS`, in order).

    `vocab_size` resizes a preset's vocabulary (training from scratch with a new tokenizer).
    """
    config = model_config(model_cfg, vocab_size=vocab_size)
    param_dtype = jnp.dtype(model_cfg.param_dtype)
    if model_cfg.hf_path:
        params, scales = _load_weights(model_cfg.hf_path, param_dtype)
        has_tok = os.path.exists(os.path.join(model_cfg.hf_path, "tokenizer.json"))
        tokenizer_dir = model_cfg.hf_path if has_tok else None
    else:
        key = jax.random.key(0) if key is None else key
        params, scales, tokenizer_dir = llama.init_params(key, config, param_dtype), None, None
    for transform in WEIGHT_TRANSFORMS:
        if model_cfg.hf_path or not transform.checkpoint_only:
            params = transform.apply(params, scales, model_cfg.get(transform.key))
    return ModelBundle(config, params, tokenizer_dir)


def _load_weights(path: str, param_dtype) -> tuple[dict, dict | None]:
    """(params, int8 scales or None): a compressed-tensors checkpoint comes back dequantized."""
    if compressed_tensors.is_compressed_tensors(path):
        _, params, scales = compressed_tensors.load_compressed(path, param_dtype=param_dtype)
        return jax.tree.map(jnp.asarray, params), scales
    return hf_io.load_hf(path, param_dtype=param_dtype)[1], None


def _quantized(params: dict, scales: dict | None, mode: str | None) -> dict:
    """`model.quantized` (eval, generate): w8a8 gives the W8A8 weights, on the checkpoint's
    own scales when it has them (round-to-nearest otherwise); auto does so only for a
    quantized checkpoint; none (the default) keeps float weights."""
    mode = mode or "none"
    if mode == "none" or (mode == "auto" and scales is None):
        return params
    return w8a8.quantize_params(params, scales)


def _packed(params: dict, scales: dict | None, packed: str | None) -> dict:
    """`model.packed` (serving): the prunable weights packed for the sparse kernels."""
    del scales  # packing takes float weights (check_model_section refuses W8A8 + packed)
    return serving.pack_params(params, packed) if packed else params


class WeightTransform(NamedTuple):
    """A `model.<key>` option that turns loaded float weights into structured leaves (the
    int8 weights of quant/w8a8.py, the packed weights of kernels/): the one seat for both."""

    key: str
    apply: Callable[[dict, dict | None, object], dict]  # (params, checkpoint scales, value)
    checkpoint_only: bool = False  # a preset's random init is not transformed


WEIGHT_TRANSFORMS = (
    WeightTransform("quantized", _quantized, checkpoint_only=True),
    WeightTransform("packed", _packed),
)
