"""Masks on disk, beside the dense checkpoint: `OUT/masks/masks.safetensors`.

One bit per weight: each targeted tensor's mask in the Hugging Face layout (out, in) and name
(`model.layers.3.mlp.up_proj.weight`, as in model.safetensors), packed along its last axis
with `np.packbits` (big bit order: bit 7 of byte j is input 8j), so a user can unpack it next
to the weight with numpy or torch alone. The file's metadata holds the format tag and the mask
tree: each params path with the stacked shape of its mask, or null for an untargeted leaf (a
0-d True). Large masks shard like the weights (`masks-0000k-of-0000n.safetensors` + index).

Written tensor by tensor (`MaskWriter`), so the layer-streamed pruner writes each block's masks
as it goes and a multi-host export gathers one tensor at a time. Directories written by older
versions (an orbax checkpoint of the bool tree) still load.
"""

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import jax
import numpy as np

from sparse_llama.ground.tree_paths import get_path, path_name, set_path
from sparse_llama.model import hf_io, sharding
from sparse_llama.model.safetensors_stream import ShardedWriter, TensorSpec
from sparse_llama.sparsity.masks import check_masks

FORMAT = "sparse_llama.masks/1"
PREFIX = "masks"
MAX_SHARD_BYTES = 2 * 10**9


def mask_leaves(masks) -> dict[str, tuple[int, ...] | None]:
    """params path -> the shape of its mask, or None for a 0-d (untargeted) leaf."""
    return {path_name(p): (tuple(m.shape) if np.ndim(m) else None)
            for p, m in jax.tree_util.tree_flatten_with_path(masks)[0]}


def _entries(leaves: dict) -> list[tuple[str, str, int | None, bool]]:
    """(tensor name, params path, layer, transposed) of every mask tensor, in the writers'
    order (hf_io.table_entries: embeddings, block by block, final norm, lm_head)."""
    stacked = [s for path, s in leaves.items() if path.startswith("layers/") and s]
    num_layers = stacked[0][0] if stacked else 0
    tied = "lm_head" not in leaves
    return [(name, "/".join(path), layer, transpose)
            for name, path, layer, transpose in hf_io.table_entries(num_layers, tied)
            if leaves.get("/".join(path))]


def _tensor_shape(shape: tuple[int, ...], layer: int | None, transpose: bool) -> tuple:
    one = shape[1:] if layer is not None else shape
    return tuple(reversed(one)) if transpose else tuple(one)


def _packed_shape(hf_shape: tuple[int, ...]) -> tuple[int, ...]:
    return (*hf_shape[:-1], -(-hf_shape[-1] // 8))


def pack(mask_ours: np.ndarray, transpose: bool) -> np.ndarray:
    """One tensor's mask in our layout -> its packed bits in the Hugging Face layout."""
    m = np.asarray(mask_ours, bool)
    return np.packbits(m.T if transpose else m, axis=-1)


class MaskWriter:
    """Every mask tensor of a tree described by `leaves` (`mask_leaves`), in `_entries` order:
    `add(path, layer, mask)` with the mask in our layout (in, out), then `close()`."""

    def __init__(self, directory: str | os.PathLike, leaves: dict):
        self.entries = _entries(leaves)
        specs = [TensorSpec(name, _packed_shape(_tensor_shape(leaves[path], layer, tr)), "uint8")
                 for name, path, layer, tr in self.entries]
        metadata = {"format": FORMAT, "leaves": json.dumps(
            {k: (list(v) if v else None) for k, v in leaves.items()})}
        Path(directory).mkdir(parents=True, exist_ok=True)
        self._writer = ShardedWriter(directory, specs, prefix=PREFIX,
                                     max_shard_bytes=MAX_SHARD_BYTES, metadata=metadata)
        self._next = 0

    def add(self, path: str, layer: int | None, mask: np.ndarray) -> None:
        name, want_path, want_layer, transpose = self.entries[self._next]
        if (path, layer) != (want_path, want_layer):
            raise ValueError(f"mask of {path} layer {layer} arrived where {name} was due")
        self._writer.add(name, pack(mask, transpose))
        self._next += 1

    def close(self) -> None:
        self._writer.close()


def save_masks(masks, directory: str | os.PathLike) -> str:
    """Write a mask tree; every process of a multi-host run calls it (each tensor is gathered
    on its own, `sharding.host_array`) and process 0 writes. The caller publishes the directory
    atomically (sparse_export.publish_dir)."""
    directory = os.path.abspath(os.fspath(directory))
    leaves = mask_leaves(masks)
    writer = MaskWriter(directory, leaves) if jax.process_index() == 0 else None
    for _, path, layer, _ in _entries(leaves):
        m = sharding.host_array(get_path(masks, tuple(path.split("/"))), layer)
        if writer is not None:
            writer.add(path, layer, m)
    if writer is not None:
        writer.close()
    return directory


def _mask_files(directory: Path) -> list[Path]:
    index = directory / f"{PREFIX}.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map") or {}
        return [directory / f for f in sorted(set(weight_map.values()))]
    return [directory / f"{PREFIX}.safetensors"]


def _read_packed(files: Iterable[Path], names: Iterable[str] | None = None
                 ) -> tuple[dict, dict]:
    """(leaves, {tensor name: packed bits}) of the new format's files: every tensor, or only
    `names` (safetensors reads just those)."""
    from safetensors import safe_open

    leaves, packed = None, {}
    wanted = None if names is None else set(names)
    for file in files:
        with safe_open(str(file), framework="numpy") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{file} is not a masks file (format {meta.get('format')!r}, "
                                 f"expected {FORMAT!r})")
            leaves = {k: (tuple(v) if v else None)
                      for k, v in json.loads(meta["leaves"]).items()}
            packed.update({name: f.get_tensor(name) for name in f.keys()
                           if wanted is None or name in wanted})
    return leaves, packed


def _unpack(packed: dict, name: str, hf_shape: tuple[int, ...], transpose: bool) -> np.ndarray:
    """One tensor's mask in our layout from its packed bits."""
    if name not in packed:
        raise ValueError(f"the masks file has no tensor {name}")
    m = np.unpackbits(packed[name], axis=-1, count=hf_shape[-1]).astype(bool)
    return m.T if transpose else m


def _unpack_tree(leaves: dict, packed: dict) -> dict:
    host = {path: (np.empty(shape, bool) if shape else np.ones((), bool))
            for path, shape in leaves.items()}
    for name, path, layer, transpose in _entries(leaves):
        m = _unpack(packed, name, _tensor_shape(leaves[path], layer, transpose), transpose)
        if layer is None:
            host[path][...] = m
        else:
            host[path][layer] = m
    tree: dict = {}
    for path, m in host.items():
        set_path(tree, tuple(path.split("/")), m)
    return tree


def _load_orbax(directory: str):
    """A masks directory of an older version: an orbax checkpoint of the bool tree."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckpt:
        return ckpt.restore(directory)


def _readable(directory: str | os.PathLike, read: Callable):
    """read(the masks files, or None for an older orbax directory), a damaged file a
    ValueError naming the directory."""
    directory = os.path.abspath(os.fspath(directory))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no masks directory at {directory}")
    files = _mask_files(Path(directory))
    try:
        return read(files if all(f.is_file() for f in files) else None)
    except Exception as err:  # safetensors and orbax raise many types for damaged files
        raise ValueError(f"{directory} is not a readable masks directory ({err}); re-run the "
                         "pruning that wrote it") from err


def check_readable(directory: str | os.PathLike) -> None:
    """Refuse a masks directory whose files are not masks files, reading their headers only
    (an older orbax directory is not checked)."""
    _readable(directory, lambda files: files is None or _read_packed(files, names=()))


def load_masks(directory: str | os.PathLike, params=None):
    """Read masks saved by `save_masks` (host bool arrays); with params, check that they fit."""
    masks = _readable(directory, lambda files: _load_orbax(os.path.abspath(directory))
                      if files is None else _unpack_tree(*_read_packed(files)))
    masks = jax.tree.map(lambda m: np.asarray(m, bool), masks)
    if params is not None:
        check_masks(params, masks)
    return masks


def load_block_masks(directory: str | os.PathLike, layer: int) -> dict:
    """Decoder block `layer`'s masks (host bool, unstacked: `llama.layer_params` of the
    tree), reading only that block's tensors; an older (orbax) directory is read whole."""
    def read(files):
        if files is None:
            return jax.tree.map(lambda m: np.asarray(m)[layer] if np.ndim(m) else m,
                                _load_orbax(os.path.abspath(directory))["layers"])
        leaves = _read_packed(files, names=())[0]
        mine = [e for e in _entries(leaves) if e[2] == layer]
        packed = _read_packed(files, names=[name for name, *_ in mine])[1]
        block: dict = {}
        for path in leaves:
            if path.startswith("layers/"):
                set_path(block, tuple(path.split("/")[1:]), np.ones((), bool))
        for name, path, _, transpose in mine:
            set_path(block, tuple(path.split("/")[1:]), _unpack(
                packed, name, _tensor_shape(leaves[path], layer, transpose), transpose))
        return block

    return jax.tree.map(lambda m: np.asarray(m, bool), _readable(directory, read))
