"""Hugging Face Llama checkpoints (config.json + safetensors) in and out.

One table, `TENSOR_TABLE`, maps Hugging Face tensor names to our params paths; load and save
both use it. Hugging Face stores linear weights (out, in) per layer; we store them (in, out)
stacked on a leading layer axis (see llama.py), hence the transposes.

Loading streams tensor by tensor: each stacked param is allocated once at its final shape and
its layer slices are filled as tensors are read, so the peak host memory is the model plus one
tensor; `read_params` reads one block (or the embeddings) alone, for the layer-streamed
pruner. Saving takes one tensor at a time to the host (gathered across processes when
sharded) and streams it into its shard of at most `max_shard_bytes` (safetensors_stream.py),
inside a temporary directory that is renamed into place only when complete.
"""

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open

from sparse_llama.ground import param_table, publish
from sparse_llama.ground.tree_paths import get_path, set_path
from sparse_llama.model import llama, sharding
from sparse_llama.model.config import LlamaConfig
from sparse_llama.model.hf_config import config_from_hf, config_to_hf
from sparse_llama.model.safetensors_stream import TensorSpec, write_tensors
from sparse_llama.sparsity.masks import check_masks

# (Hugging Face name, our params path, transposed). "{i}" marks a per-layer tensor, stored at
# index i of the leading layer axis of our stacked param.
TENSOR_TABLE: tuple[tuple[str, tuple[str, ...], bool], ...] = tuple(
    (p.hf_name, p.path, p.transposed) for p in param_table.PARAMS)  # ground/param_table.py
# Buffers some exporters include; they are recomputed from the config, never loaded.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# The files that travel with a model's tokenizer, for every writer (save_hf's `tokenizer_dir`,
# a training run's <workdir>/tokenizer): the tokenizer, its settings and chat template, and
# generation_config.json, whose stop ids (Llama-3-Instruct lists several) and sampling
# defaults belong to the same model.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "added_tokens.json", "vocab.json", "merges.txt",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")
_GENERATION_CONFIG = "generation_config.json"
_SAVE_DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' classic "5GB"


class HFTensor(NamedTuple):
    """Where one Hugging Face tensor lives in our params."""

    path: tuple[str, ...]  # our params path
    layer: int | None  # index on the stacked layer axis, None for unstacked params
    transpose: bool
    hf_shape: tuple[int, ...]  # the tensor's shape in the Hugging Face file


def table_entries(num_layers: int, tied: bool) -> list[tuple[str, tuple[str, ...], int | None,
                                                              bool]]:
    """(Hugging Face name, params path, layer or None, transposed) of every tensor, in the order
    the writers use: the embeddings, then block by block (each block's tensors together), then
    the final norm and lm_head (absent when tied) — Hugging Face's own order, which is also the
    order the layer-streamed pruner produces them."""
    entries, done_layers = [], False
    for pattern, path, transpose in TENSOR_TABLE:
        if path == ("lm_head",) and tied:
            continue
        if "{i}" not in pattern:
            entries.append((pattern, path, None, transpose))
        elif not done_layers:
            done_layers = True
            per_layer = [row for row in TENSOR_TABLE if "{i}" in row[0]]
            entries += [(pat.format(i=i), pth, i, tr)
                        for i in range(num_layers) for pat, pth, tr in per_layer]
    return entries


def hf_tensor_names(config: LlamaConfig) -> dict[str, HFTensor]:
    """Every Hugging Face tensor name of a `config` checkpoint -> where it lives in our params,
    in `table_entries` order. `lm_head.weight` is absent when the embeddings are tied."""
    shapes = llama.param_shapes(config)
    names = {}
    for name, path, layer, transpose in table_entries(config.num_layers,
                                                      config.tie_word_embeddings):
        shape = get_path(shapes, path)
        one = shape[1:] if layer is not None else shape
        names[name] = HFTensor(path, layer, transpose,
                               tuple(reversed(one)) if transpose else tuple(one))
    return names


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def weight_files(ckpt: Path) -> list[Path]:
    """The safetensors files of a checkpoint dir (one file, or the shards of its index)."""
    index = ckpt / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no 'weight_map'")
        files = [ckpt / f for f in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.exists()]
        if absent:
            raise FileNotFoundError(f"{index} lists shard(s) {absent} that are not in {ckpt}")
        return files
    if (ckpt / "model.safetensors").exists():
        return [ckpt / "model.safetensors"]
    if list(ckpt.glob("pytorch_model*.bin")):
        raise FileNotFoundError(
            f"{ckpt} holds PyTorch pickle weights (pytorch_model*.bin); sparse_llama reads "
            "safetensors only. Convert once with: python -c \"from transformers import "
            f"AutoModelForCausalLM as M; M.from_pretrained('{ckpt}').save_pretrained('OUT_DIR')\"")
    raise FileNotFoundError(f"{ckpt} has no model.safetensors and no "
                            "model.safetensors.index.json")


def _open(file: Path):
    try:
        return safe_open(str(file), framework="numpy")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"cannot read safetensors file {file} (corrupted header?): {e}") from e


class CheckpointIndex(NamedTuple):
    """A checked Hugging Face checkpoint directory: its config and where each tensor is."""

    config: LlamaConfig
    tensors: dict[str, HFTensor]  # every expected tensor (hf_tensor_names)
    files: dict[str, Path]  # tensor name -> the safetensors file holding it


def open_checkpoint(path: str | os.PathLike) -> CheckpointIndex:
    """Check a checkpoint directory's config and every tensor header, reading no weights.

    The directory holds `config.json` and `model.safetensors`, or shards listed by
    `model.safetensors.index.json`. Every expected tensor must be present with its shape and
    no other tensor may be (`*.rotary_emb.inv_freq` buffers excepted; a tied checkpoint's
    `lm_head.weight` is ignored): an extra tensor means an architecture we would silently
    compute wrongly. Raises FileNotFoundError (missing dir, config or weights) or ValueError
    (anything else), naming the file or tensor at fault, in seconds whatever the model's size.
    """
    ckpt = Path(path)
    if not ckpt.is_dir():
        raise FileNotFoundError(f"checkpoint directory {ckpt} does not exist")
    if not (ckpt / "config.json").exists():
        raise FileNotFoundError(f"{ckpt} has no config.json; is it a Hugging Face checkpoint?")
    config = config_from_hf(_read_json(ckpt / "config.json"), source=str(ckpt))
    expected = hf_tensor_names(config)
    located: dict[str, Path] = {}
    unexpected = []
    for file in weight_files(ckpt):
        with _open(file) as f:
            for name in f.keys():
                if name.endswith(IGNORED_SUFFIXES) or (
                        name == "lm_head.weight" and config.tie_word_embeddings):
                    continue
                if name not in expected:
                    unexpected.append(name)
                    continue
                shape = tuple(f.get_slice(name).get_shape())
                if shape != expected[name].hf_shape:
                    raise ValueError(f"tensor {name} in {file} has shape {shape}, expected "
                                     f"{expected[name].hf_shape} from config.json")
                located[name] = file
    if unexpected:
        raise ValueError(f"{ckpt} has tensors a Llama does not: {sorted(unexpected)[:8]}")
    missing = [n for n in expected if n not in located]
    if missing:
        raise ValueError(f"{ckpt} is missing tensor(s) {missing[:8]} ({len(missing)} in all)")
    return CheckpointIndex(config, expected, located)


def _get_tensor(f, name: str, file: Path) -> np.ndarray:
    try:
        return f.get_tensor(name)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"cannot read tensor {name} from {file}: {e}") from e


def _ours(t: np.ndarray, where: HFTensor, np_dtype) -> np.ndarray:
    return (t.T if where.transpose else t).astype(np_dtype, copy=False)


def read_params(index: CheckpointIndex, layer: int | None, np_dtype,
                names: tuple[str, ...] | None = None) -> dict:
    """Host params of one decoder block (`layer`; the structure of `llama.layer_params`), or
    of everything outside the blocks (None: embeddings, final norm, lm_head; `names` picks
    some of them), read tensor by tensor: the rest of the checkpoint is never in memory
    (layer-streamed pruning)."""
    out: dict = {}
    names = [n for n, w in index.tensors.items()
             if w.layer == layer and (names is None or n in names)]
    for file in dict.fromkeys(index.files[n] for n in names):
        with _open(file) as f:
            for name in (n for n in names if index.files[n] == file):
                where = index.tensors[name]
                set_path(out, where.path[1:] if layer is not None else where.path,
                         _ours(_get_tensor(f, name, file), where, np_dtype))
    return out


def load_hf(path: str | os.PathLike, *, param_dtype=jnp.float32) -> tuple[LlamaConfig, dict]:
    """(config, params) of a Hugging Face Llama checkpoint directory (`open_checkpoint` says
    what it must hold). Params are `param_dtype`, laid out as in llama.py."""
    index = open_checkpoint(path)
    np_dtype = np.dtype(param_dtype)
    host = jax.tree.map(lambda s: np.empty(s, np_dtype), llama.param_shapes(index.config),
                        is_leaf=lambda x: isinstance(x, tuple))
    for file in dict.fromkeys(index.files.values()):
        with _open(file) as f:
            for name in (n for n, fl in index.files.items() if fl == file):
                where = index.tensors[name]
                dest = get_path(host, where.path)
                t = _ours(_get_tensor(f, name, file), where, np_dtype)
                if where.layer is None:
                    dest[...] = t
                else:
                    dest[where.layer] = t
    return index.config, _to_device(host)


def _to_device(host: dict) -> dict:
    """jax arrays of a numpy tree, popping each host leaf so the peak stays near one model."""
    out = {}
    for k in list(host):
        v = host.pop(k)
        out[k] = _to_device(v) if isinstance(v, dict) else jnp.asarray(v)
    return out


def cast_finite(w: np.ndarray, np_dtype, name: str) -> np.ndarray:
    """`w` cast to the stored dtype; a finite value that the cast makes infinite (float16
    above 65504) is a ValueError naming the tensor, raised while the checkpoint is still
    being built, so nothing is published. (NaN / inf already in w are the pruner's and the
    training loop's to refuse: they name the block, the step.)"""
    with np.errstate(over="ignore", invalid="ignore"):
        out = w.astype(np_dtype, copy=False)
    bad = int(np.count_nonzero(np.isfinite(w)) - np.count_nonzero(np.isfinite(out)))
    if bad > 0:
        dtype = np.dtype(np_dtype).name
        raise ValueError(
            f"{name}: {bad} value{'' if bad == 1 else 's'} {'is' if bad == 1 else 'are'} not "
            f"finite in {dtype} (largest |w| {float(np.max(np.abs(w[np.isfinite(w)]))):.6g}, "
            f"beyond {dtype}'s {float(jnp.finfo(np_dtype).max):.6g}); nothing was published: "
            "save in float32 or bfloat16")
    return out


def stored_tensor(w: np.ndarray, keep: np.ndarray | None, transpose: bool, np_dtype, *,
                  name: str) -> np.ndarray:
    """One host tensor as a checkpoint stores it: entries `keep` drops exact zeros, cast to
    the stored dtype (`cast_finite`: an overflow is an error naming `name`), in
    the Hugging Face layout (contiguous)."""
    if keep is not None:
        w = np.where(keep, w, np.zeros((), w.dtype))
    w = cast_finite(w, np_dtype, name)
    return np.ascontiguousarray(w.T if transpose else w)


def hf_tensors(params: dict, masks, config: LlamaConfig, np_dtype):
    """(Hugging Face name, numpy array) of every tensor in `table_entries` order, one tensor
    on the host at a time; pruned entries (masks False) are exact zeros."""
    for name, where in hf_tensor_names(config).items():
        m = None if masks is None else get_path(masks, where.path)
        keep = (None if m is None or (jnp.ndim(m) == 0 and bool(m))
                else sharding.host_array(m, where.layer))
        w = sharding.host_array(get_path(params, where.path), where.layer)
        yield name, stored_tensor(w, keep, where.transpose, np_dtype, name=name)


def _observed(tensors, on_tensor: Callable[[str, np.ndarray], None]):
    for name, t in tensors:
        on_tensor(name, t)
        yield name, t


def hf_tensor_specs(config: LlamaConfig, dtype: str) -> list[TensorSpec]:
    """The write plan of a checkpoint's weights: every tensor's name, shape and dtype."""
    return [TensorSpec(name, where.hf_shape, dtype)
            for name, where in hf_tensor_names(config).items()]


def _check_params(params: dict, config: LlamaConfig) -> None:
    shapes = llama.param_shapes(config)
    got = jax.tree.map(lambda w: tuple(w.shape), params)
    want_flat = dict(jax.tree_util.tree_flatten_with_path(
        shapes, is_leaf=lambda x: isinstance(x, tuple))[0])
    got_flat = dict(jax.tree_util.tree_flatten_with_path(
        got, is_leaf=lambda x: isinstance(x, tuple))[0])
    if want_flat.keys() != got_flat.keys():
        raise ValueError("params do not match the config: missing "
                         f"{[jax.tree_util.keystr(k) for k in want_flat.keys() - got_flat.keys()]}"
                         ", unexpected "
                         f"{[jax.tree_util.keystr(k) for k in got_flat.keys() - want_flat.keys()]}")
    for k, shape in want_flat.items():
        if got_flat[k] != shape:
            raise ValueError(f"param {jax.tree_util.keystr(k)} has shape {got_flat[k]}, the "
                             f"config implies {shape}")


def _tokenizer_files(tokenizer_dir) -> tuple[list[Path], dict]:
    """(the tokenizer files to copy, the source's generation_config or {}), checked."""
    if tokenizer_dir is None:
        return [], {}
    tok_dir = Path(tokenizer_dir)
    if not tok_dir.is_dir():
        raise FileNotFoundError(f"tokenizer directory {tok_dir} does not exist")
    tok_files = [tok_dir / n for n in TOKENIZER_FILES if (tok_dir / n).exists()]
    if not tok_files:
        raise FileNotFoundError(f"{tok_dir} holds none of the tokenizer files "
                                f"{list(TOKENIZER_FILES)}")
    gen = [f for f in tok_files if f.name == _GENERATION_CONFIG]
    return [f for f in tok_files if f not in gen], (_read_json(gen[0]) if gen else {})


def check_save_dtype(dtype: str) -> None:
    if dtype not in _SAVE_DTYPES:
        raise ValueError(f"dtype must be one of {_SAVE_DTYPES}, got {dtype!r}")


def write_hf_metadata(config: LlamaConfig, directory: Path, *, dtype: str,
                      tokenizer_dir=None, generation_config: dict | None = None) -> None:
    """config.json, generation_config.json and the tokenizer files of a checkpoint.

    generation_config.json: bos/eos of the config, updated with `tokenizer_dir`'s
    generation_config.json (its full eos list, sampling defaults), then with
    `generation_config`, so the caller's values win.
    """
    tok_files, source_gen = _tokenizer_files(tokenizer_dir)
    (directory / "config.json").write_text(json.dumps(config_to_hf(config, dtype), indent=2)
                                           + "\n")
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
           **source_gen, **(generation_config or {})}
    (directory / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    for f in tok_files:
        shutil.copy2(f, directory / f.name)


def write_hf(params: dict, config: LlamaConfig, directory: str | os.PathLike, *, masks=None,
             tokenizer_dir: str | os.PathLike | None = None, dtype: str | None = None,
             max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
             generation_config: dict | None = None,
             on_tensor: Callable[[str, np.ndarray], None] | None = None) -> None:
    """The files of a Hugging Face checkpoint of `params` into the existing `directory`.

    Every process of a multi-host run calls it with its (sharded) params; tensors are gathered
    one at a time (`sharding.host_array`) and process 0 alone writes, streaming each tensor
    into its shard (`safetensors_stream`), so no host holds more than one tensor besides its
    own shards.
    Files: model.safetensors (or shards of at most `max_shard_bytes` plus
    model.safetensors.index.json) and `write_hf_metadata`'s.
    masks: pytree like params (bool); pruned entries are written as exact zeros, so the dense
      checkpoint loads anywhere (docs/algorithms.md, "Checkpoint format").
    dtype: stored dtype ('float32', 'bfloat16', 'float16'); None keeps the embedding's dtype.
      A value the cast overflows (float16 above 65504) is an error naming the tensor.
    on_tensor(name, stored): called with every tensor as it is stored (masked, cast, Hugging
      Face layout), on every process: what a report of the written checkpoint counts.
    """
    _check_params(params, config)
    if masks is not None:
        check_masks(params, masks)
    dtype = dtype or np.dtype(params["embed_tokens"].dtype).name
    check_save_dtype(dtype)
    _tokenizer_files(tokenizer_dir)  # a bad tokenizer dir fails before any tensor moves
    tensors = hf_tensors(params, masks, config, np.dtype(jnp.dtype(dtype)))
    if on_tensor is not None:
        tensors = _observed(tensors, on_tensor)
    if jax.process_index() != 0:
        for _ in tensors:  # the gathers are collective: take part, write nothing
            pass
        return
    directory = Path(directory)
    write_tensors(directory, hf_tensor_specs(config, dtype), tensors,
                  max_shard_bytes=max_shard_bytes, metadata={"format": "pt"})
    write_hf_metadata(config, directory, dtype=dtype, tokenizer_dir=tokenizer_dir,
                      generation_config=generation_config)


def save_hf(params: dict, config: LlamaConfig, out_dir: str | os.PathLike, *, masks=None,
            tokenizer_dir: str | os.PathLike | None = None, dtype: str | None = None,
            max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
            generation_config: dict | None = None) -> Path:
    """Write a Hugging Face Llama checkpoint of `params` to `out_dir` (`write_hf`'s files);
    returns its path. One process: a multi-host run publishes `write_hf` through
    `ground.publish.publish_dir` itself.

    The checkpoint is written to a directory beside `out_dir` and renamed into place
    (ground/publish.py), so a crash never leaves a partial checkpoint. An existing `out_dir`
    is replaced only if it is empty or holds a config.json (a previous checkpoint); otherwise
    FileExistsError.
    """
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    publish.check_replaceable(out_dir)
    return publish.publish_dir(out_dir, lambda staging: write_hf(
        params, config, staging, masks=masks, tokenizer_dir=tokenizer_dir, dtype=dtype,
        max_shard_bytes=max_shard_bytes, generation_config=generation_config))
