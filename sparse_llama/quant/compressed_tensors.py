"""The compressed-tensors W8A8 `int-quantized` layout, out and in (docs/algorithms.md,
"Compressed-tensors layouts").

    config.json              + quantization_config (QUANTIZATION_CONFIG: int8 weights per
                               output channel, symmetric; int8 activations per token, dynamic;
                               lm_head ignored; sparsity_config empty)
    model.safetensors        every quantized linear as NAME.weight int8 (out, in) and
                               NAME.weight_scale float32 (out, 1); w = weight * weight_scale;
                               embeddings, norms and lm_head as plain float tensors
    masks/, sparsity_report.json   as beside a pruned checkpoint (transformers ignores them)

What transformers loads with the `compressed-tensors` package installed and vLLM serves as
W8A8. The writer builds the Hugging Face directory with `hf_io.save_hf` (config, tokenizer,
generation config, shards) and then re-encodes the quantized linears of its safetensors files,
all inside one staging directory renamed into place (`ground.publish.publish_dir`). The reader
takes any `int-quantized` / `naive-quantized` checkpoint with channel-wise symmetric int8
weights (an int8 tensor needs its scale; float tensors are read as they are) and returns float
params plus the scales, so the W8A8 weights are rebuilt exactly.
"""

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from sparse_llama.ground.publish import publish_dir, write_file
from sparse_llama.ground.tree_paths import get_path, path_name
from sparse_llama.model import hf_io, llama
from sparse_llama.model.config import LlamaConfig
from sparse_llama.model.hf_config import config_from_hf
from sparse_llama.quant.w8a8 import QMAX
from sparse_llama.sparse_io import mask_io
from sparse_llama.sparsity.masks import is_target

FORMAT = "int-quantized"
_READABLE_FORMATS = ("int-quantized", "naive-quantized")
QUANTIZATION_CONFIG = {
    "quant_method": "compressed-tensors",
    "format": FORMAT,
    "quantization_status": "compressed",
    "config_groups": {"group_0": {
        "targets": ["Linear"],
        "weights": {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True,
                    "dynamic": False},
        "input_activations": {"num_bits": 8, "type": "int", "strategy": "token",
                              "symmetric": True, "dynamic": True},
    }},
    "ignore": ["lm_head"],
    "sparsity_config": {},
}
_SCALE = "_scale"  # NAME.weight -> NAME.weight_scale


def quantization_config(path: str | os.PathLike) -> dict | None:
    """The `quantization_config` of a checkpoint directory's config.json, or None."""
    file = Path(path) / "config.json"
    if not file.is_file():
        return None
    try:
        found = json.loads(file.read_text()).get("quantization_config")
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from e
    return found if isinstance(found, dict) else None


def is_compressed_tensors(path: str | os.PathLike) -> bool:
    qc = quantization_config(path)
    return qc is not None and qc.get("quant_method") == "compressed-tensors"


def _check_readable(qc: dict, source: str) -> None:
    """ValueError unless every config group is symmetric int8 per channel (what we decode)."""
    if qc.get("format") not in _READABLE_FORMATS:
        raise ValueError(f"{source}: compressed-tensors format {qc.get('format')!r} is not "
                         f"supported; sparse_llama reads {_READABLE_FORMATS} (int8 weights)")
    if qc.get("sparsity_config"):
        raise ValueError(f"{source}: a compressed-tensors sparsity_config is not supported; "
                         "export it dense (pruned weights as exact zeros)")
    for name, group in (qc.get("config_groups") or {}).items():
        w = group.get("weights") or {}
        if (w.get("num_bits"), w.get("type"), w.get("strategy"), w.get("symmetric")) != (
                8, "int", "channel", True):
            raise ValueError(f"{source}: config group {name!r} has weights {w}; sparse_llama "
                             "reads symmetric int8 per-channel weights only")


def _layer_scales(scales: dict, path: tuple[str, ...], layer: int | None) -> np.ndarray:
    s = np.asarray(scales["/".join(path)], np.float32)
    return s if layer is None else s[layer]


def _encode_file(file: Path, names: dict, scales: dict, dtype) -> dict[str, str]:
    """Rewrite one float32 safetensors file with the quantized linears as int8 + scale and the
    other tensors in `dtype`; returns {scale tensor name: file name}."""
    tensors = {}
    with safe_open(str(file), framework="numpy") as f:
        for name in f.keys():
            tensors[name] = f.get_tensor(name)
    added = {}
    for name in list(tensors):
        where = names.get(name)
        if where is None or "/".join(where.path) not in scales:
            tensors[name] = hf_io.cast_finite(tensors[name], dtype, name)
            continue
        s = _layer_scales(scales, where.path, where.layer)  # (out,)
        codes = np.round(tensors[name].astype(np.float32) / s[:, None])
        tensors[name] = np.clip(codes, -QMAX, QMAX).astype(np.int8)
        tensors[name + _SCALE] = s[:, None].copy()
        added[name + _SCALE] = file.name
    write_file(file, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    return added


def save_compressed(params: dict, scales: dict, config: LlamaConfig,
                    out_dir: str | os.PathLike, *, masks: dict | None = None,
                    tokenizer_dir: str | None = None, dtype: str | None = None,
                    report: dict | None = None) -> Path:
    """Write the W8A8 compressed-tensors directory of float `params` whose quantized linears
    lie on `scales` ({'layers/self_attn/q_proj': (L, out)}, every targeted linear).

    The linears are written float32 first (so their codes are exact), then encoded; the other
    tensors in `dtype` (default: the embedding's).
    """
    missing = [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]
               if is_target(path_name(p)) and path_name(p) not in scales]
    if missing:
        raise ValueError(f"no int8 scales for {missing[:4]}: the compressed-tensors layout "
                         "needs every linear quantized per output channel (quant.group_size=0)")
    if jax.process_count() > 1:
        raise ValueError("the compressed-tensors export runs in one process; export the hf "
                         "format and convert it on one host")
    dtype = dtype or np.dtype(params["embed_tokens"].dtype).name
    np_dtype = np.dtype(jnp.dtype(dtype))
    names = hf_io.hf_tensor_names(config)

    def write(staging: Path) -> None:
        hf_io.save_hf(params, config, staging, masks=masks, tokenizer_dir=tokenizer_dir,
                      dtype="float32")
        added = {}
        for file in sorted(staging.glob("*.safetensors")):
            added.update(_encode_file(file, names, scales, np_dtype))
        index = staging / "model.safetensors.index.json"
        if index.exists():
            data = json.loads(index.read_text())
            data["weight_map"] = dict(sorted({**data["weight_map"], **added}.items()))
            data["metadata"] = {"total_size": sum(f.stat().st_size
                                                  for f in staging.glob("*.safetensors"))}
            index.write_text(json.dumps(data, indent=2) + "\n")
        cfg = json.loads((staging / "config.json").read_text())
        cfg.update({k: dtype for k in ("dtype", "torch_dtype") if k in cfg})
        cfg["quantization_config"] = QUANTIZATION_CONFIG
        (staging / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        if masks is not None:
            mask_io.save_masks(masks, staging / "masks")
        if report is not None:
            (staging / "sparsity_report.json").write_text(json.dumps(report, indent=1))

    return publish_dir(out_dir, write)


def load_compressed(path: str | os.PathLike, *, param_dtype=np.float32
                    ) -> tuple[LlamaConfig, dict, dict]:
    """(config, float params, scales) of a compressed-tensors int8 checkpoint directory.

    Quantized linears come back dequantized (weight * weight_scale) in `param_dtype`; scales
    holds (L, out) float32 for every params path whose layers are all int8.
    """
    ckpt = Path(path)
    qc = quantization_config(ckpt)
    if qc is None or qc.get("quant_method") != "compressed-tensors":
        raise ValueError(f"{ckpt} is not a compressed-tensors checkpoint (no quantization_config "
                         "with quant_method 'compressed-tensors' in config.json)")
    _check_readable(qc, str(ckpt))
    config = config_from_hf(json.loads((ckpt / "config.json").read_text()), source=str(ckpt))
    names = hf_io.hf_tensor_names(config)
    tensors = {}
    for file in hf_io.weight_files(ckpt):  # the reader of hf_io: one file or an index
        with safe_open(str(file), framework="numpy") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    host = jax.tree.map(lambda s: np.empty(s, np.dtype(param_dtype)), llama.param_shapes(config),
                        is_leaf=lambda x: isinstance(x, tuple))
    layer_scales: dict[str, dict] = {}
    for name, where in names.items():
        if name not in tensors:
            raise ValueError(f"{ckpt} is missing tensor {name}")
        t = tensors.pop(name)
        if t.shape != where.hf_shape:
            raise ValueError(f"tensor {name} in {ckpt} has shape {t.shape}, expected "
                             f"{where.hf_shape} from config.json")
        if t.dtype == np.int8:
            scale = tensors.pop(name + _SCALE, None)
            if scale is None or scale.size != t.shape[0]:
                raise ValueError(f"{ckpt}: int8 tensor {name} has no per-channel "
                                 f"{name + _SCALE} of {t.shape[0]} values")
            scale = scale.astype(np.float32).reshape(-1)
            t = t.astype(np.float32) * scale[:, None]
            layer_scales.setdefault("/".join(where.path), {})[where.layer] = scale
        dest = get_path(host, where.path)
        t = (t.T if where.transpose else t).astype(dest.dtype)
        if where.layer is None:
            dest[...] = t
        else:
            dest[where.layer] = t
    extra = [n for n in tensors if not n.endswith(hf_io.IGNORED_SUFFIXES)
             and not (n == "lm_head.weight" and config.tie_word_embeddings)]
    if extra:
        raise ValueError(f"{ckpt} has tensors sparse_llama does not read: {sorted(extra)[:6]}")
    scales = {p: np.stack([by_layer[i] for i in range(config.num_layers)])
              for p, by_layer in layer_scales.items()
              if p.startswith("layers/") and len(by_layer) == config.num_layers}
    return config, jax.tree.map(np.asarray, host), scales
