"""Which mask a training run keeps, decided once before its first step (`sparsity` section).

- `sparsity.keep=True` starting from `model.hf_path` (a `launch.prune` output or an earlier
  sparse run's export): the masks from `sparsity.masks_path`, else `<hf_path>/masks` when it
  exists, else the checkpoint's exact zeros in the target tensors. The log says which. A mask
  whose tree or shapes do not fit the model, a checkpoint whose pruned positions are not
  zero, and a start that is not sparse (under `SPARSE_CHECKPOINT_MIN` of its target weights
  pruned: a dense checkpoint would train dense and export an all-True `masks/`) are refused
  before any step.
- `sparsity.init="random"|"magnitude"` with `sparsity.sparsity=S`: a static mask chosen at the
  start (SPDF pretrains from scratch this way), applied to the initial or loaded weights.
  It never replaces a mask: with `sparsity.masks_path`, or from a `model.hf_path` that has
  `masks/` or is sparse, it is refused up front (`check_sparsity_config`). Refused rather than
  combined with the old zeros: a union would no longer prune the asked fraction S of every
  matrix, and extending a mask is what a prune stage does (`pruning.keep_zeros`).
- `sparsity.keep=False` (dense training) from a sparse checkpoint (at least
  `SPARSE_CHECKPOINT_MIN` exact zeros in its target tensors): a warning that the run will make
  it dense, naming configs/sparse.py and configs/spdf.py, unless `sparsity.release=True` says
  that is the plan (SPDF's dense stage).
- Adapters of a frozen model (LoRA, `frozen_masks`) keep the base's mask whatever
  `sparsity.keep` says.

The masks themselves then live in the optimizer state (`optim/keep_sparse.py`).
`checkpoint_sparsity(hf_dir)` measures a directory's target sparsity from its files alone (a
recipe's up-front check).
"""
import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import jax
import ml_collections
import numpy as np
from absl import logging
from safetensors import safe_open

from sparse_llama.ground.tree_paths import path_name
from sparse_llama.model import hf_io
from sparse_llama.sparse_io import mask_io
from sparse_llama.sparsity import masks as masks_lib
from sparse_llama.sparsity.static import STATIC_KINDS, static_masks

# A checkpoint is sparse when at least this fraction of its target weights is pruned. Real
# prunes are far above it (2:8 is 25%; the usual 50-70% unstructured; an export of a run that
# trained one keeps exactly its mask) and dense checkpoints far below (~0% exact zeros; bf16
# training leaves a few in 10^4). A sparse start under it is refused; a dense run from a
# checkpoint at or over it warns that it will densify it.
SPARSE_CHECKPOINT_MIN = 0.10


def check_sparsity_config(config: ml_collections.ConfigDict) -> None:
    """Raise ValueError naming the key and the fix for an inconsistent `sparsity` section."""
    s = config.get("sparsity")
    if s is None:
        return
    init, keep = s.get("init", ""), s.get("keep", False)
    if not isinstance(keep, bool):
        raise ValueError(f"sparsity.keep must be True or False, got {keep!r}")
    if init not in ("", *STATIC_KINDS):
        raise ValueError(f"sparsity.init={init!r} is not one of {('', *STATIC_KINDS)} "
                         "('' keeps the starting checkpoint's own mask)")
    if init:
        value = s.get("sparsity", 0.0)
        if not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
            raise ValueError(f"sparsity.sparsity must be in (0, 1) with sparsity.init={init!r}, "
                             f"got {value!r}")
        if not keep:
            raise ValueError(f"sparsity.init={init!r} chooses a mask that only "
                             "sparsity.keep=True keeps; set it, or drop sparsity.init")
        _check_nothing_to_replace(init, s.get("masks_path", ""), config.model.get("hf_path"))
    if s.get("masks_path"):
        if not keep:
            raise ValueError("sparsity.masks_path is set but sparsity.keep=False would ignore "
                             "it; set sparsity.keep=True (configs/sparse.py)")
        if not os.path.isdir(s.masks_path):
            raise FileNotFoundError(f"sparsity.masks_path={s.masks_path!r} is not a directory "
                                    "(a launch.prune output's masks/)")
    if keep and not init and not config.model.get("hf_path"):
        raise ValueError("sparsity.keep=True needs a sparse start: model.hf_path (a launch.prune "
                         "output) or sparsity.init=random|magnitude with sparsity.sparsity")


def _check_nothing_to_replace(init: str, masks_path: str, hf_path: str | None) -> None:
    """ValueError when the static mask of `sparsity.init` would replace an existing mask."""
    if masks_path:
        raise ValueError(f"sparsity.init={init!r} and sparsity.masks_path={masks_path!r} are "
                         "both set: the static mask would replace those masks; drop one")
    if not hf_path or not os.path.isdir(hf_path):
        return
    fix = ("drop sparsity.init to keep it (configs/sparse.py), or start from the dense model "
           "it was pruned from")
    own = os.path.join(hf_path, "masks")
    if os.path.isdir(own):
        raise ValueError(f"sparsity.init={init!r} would replace the mask of {own} (the "
                         f"starting checkpoint's own); {fix}")
    sparsity = checkpoint_sparsity(hf_path)
    if sparsity >= SPARSE_CHECKPOINT_MIN:
        raise ValueError(f"sparsity.init={init!r} would replace the mask of {hf_path} "
                         f"({100 * sparsity:.1f}% of its target weights are exact zeros); {fix}")


def keeps_mask(config: ml_collections.ConfigDict) -> bool:
    """Whether a run keeps a sparse mask (`sparsity.keep`; configs/sparse.py)."""
    section = config.get("sparsity")
    return bool(section is not None and section.get("keep", False))


def target_sparsity(params: dict) -> float:
    """Fraction of exact zeros over the target tensors."""
    zeros = total = 0
    for path, w in jax.tree_util.tree_flatten_with_path(params)[0]:
        if masks_lib.is_target(path_name(path)):
            w = np.asarray(w)
            zeros += int(np.count_nonzero(w == 0))
            total += w.size
    return zeros / max(total, 1)


def mask_sparsity(masks: dict) -> float:
    """Fraction of pruned (False) entries over the full-shape (targeted) mask leaves."""
    pruned = total = 0
    for m in jax.tree.leaves(masks):
        if np.ndim(m):
            m = np.asarray(m)
            pruned += m.size - int(np.count_nonzero(m))
            total += m.size
    return pruned / max(total, 1)


def _zero_count(t: np.ndarray) -> int:
    """Exact zeros (+0.0 and -0.0) of a float tensor of any width (bf16 included): the
    entries whose bits are all 0 but the sign's, counted on an unsigned view (no copy, no
    cast)."""
    bits = t.view(f"u{t.itemsize}")
    return bits.size - int(np.count_nonzero(bits << 1))


def _masks_file_sparsity(masks_dir: Path) -> float:
    """Pruned fraction of a masks directory: the set bits of its packed tensors (packbits
    pads with 0 bits: they count as neither kept nor weights) over the masked weights its
    metadata lists. An older (orbax) masks directory is loaded whole (bools: 1/4 of a f32
    model)."""
    files = sorted(masks_dir.glob(f"{mask_io.PREFIX}*.safetensors"))
    if not files:
        return mask_sparsity(mask_io.load_masks(masks_dir))
    kept, leaves = 0, None
    for file in files:
        with safe_open(str(file), framework="numpy") as f:
            meta = f.metadata() or {}
            if meta.get("format") != mask_io.FORMAT:
                raise ValueError(f"{file} is not a masks file (format {meta.get('format')!r}, "
                                 f"expected {mask_io.FORMAT!r})")
            leaves = json.loads(meta["leaves"])
            for name in f.keys():
                kept += int(np.bitwise_count(f.get_tensor(name)).sum(dtype=np.int64))
    total = sum(math.prod(shape) for shape in leaves.values() if shape)
    return 1.0 - kept / max(total, 1)


def checkpoint_sparsity(hf_dir: str | os.PathLike) -> float:
    """The fraction of a Hugging Face directory's target weights that are pruned: from its
    `masks/` when it has one (the bits of the masks file), else its exact zeros.

    Reads the files alone, one tensor at a time with numpy (no device, never the whole model):
    the masks file is 1/32 of a f32 model; the zeros cost one pass over the target tensors.
    FileNotFoundError / ValueError (`hf_io.open_checkpoint`) for what is not a checkpoint.
    """
    index = hf_io.open_checkpoint(hf_dir)
    masks_dir = Path(hf_dir) / "masks"
    if masks_dir.is_dir():
        return _masks_file_sparsity(masks_dir)
    names = [n for n, where in index.tensors.items()
             if masks_lib.is_target("/".join(where.path))]
    zeros = total = 0
    for file in dict.fromkeys(index.files[n] for n in names):
        with safe_open(str(file), framework="numpy") as f:
            for name in (n for n in names if index.files[n] == file):
                t = f.get_tensor(name)
                zeros, total = zeros + _zero_count(t), total + t.size
    return zeros / max(total, 1)


def _check_zeros_where_pruned(params: dict, masks: dict, source: str) -> None:
    bad = []
    for (path, w), m in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                            jax.tree.leaves(masks), strict=True):
        if np.ndim(m) == 0:
            continue
        n = int(np.count_nonzero(np.asarray(w)[~np.asarray(m)]))
        if n:
            bad.append(f"{path_name(path)} ({n} nonzero)")
    if bad:
        raise ValueError(f"the starting checkpoint has nonzero weights where the masks from "
                         f"{source} prune: {', '.join(bad[:4])}; start from the directory "
                         "launch.prune wrote (its weights are zero where its masks prune), or "
                         "pass the masks that belong to this checkpoint")


def _start_masks(config: ml_collections.ConfigDict, params: dict) -> tuple[dict, str]:
    """(host masks, where they came from) of the checkpoint `params` were loaded from:
    `sparsity.masks_path`, else `<hf_path>/masks`, else its exact zeros; checked to fit and
    to be zero where they prune."""
    masks_path = (config.get("sparsity") or {}).get("masks_path", "")
    default = os.path.join(config.model.hf_path, "masks")
    path = masks_path or (default if os.path.isdir(default) else "")
    if path:
        masks = mask_io.load_masks(path, params)
        source = path
    else:
        masks = masks_lib.masks_from_zeros(params)
        source = f"the exact zeros of {config.model.hf_path}"
    masks = jax.tree.map(lambda m: np.asarray(m, bool), masks)
    _check_zeros_where_pruned(params, masks, source)
    return masks, source


def loaded_masks(config: ml_collections.ConfigDict, params: dict) -> dict | None:
    """The masks a run from `model.hf_path` keeps (None for a dense run); checks and logs.
    ValueError for a sparse run whose start is not sparse (`SPARSE_CHECKPOINT_MIN`)."""
    s = config.get("sparsity") or ml_collections.ConfigDict({"keep": False})
    if not s.get("keep", False):
        sparsity = target_sparsity(params)
        if sparsity >= SPARSE_CHECKPOINT_MIN and not s.get("release", False):
            logging.warning(
                "model.hf_path=%s has %.1f%% exact zeros in its target tensors, and this dense "
                "run will train them back to nonzero values; to keep the mask use "
                "configs/sparse.py (sparsity.keep=True), to release it on purpose "
                "configs/spdf.py (sparsity.release=True)", config.model.hf_path,
                100 * sparsity)
        return None
    if s.get("init"):
        return None  # a static mask is chosen on the loaded weights (`static_mask_fn`)
    masks, source = _start_masks(config, params)
    sparsity = mask_sparsity(masks)
    if sparsity < SPARSE_CHECKPOINT_MIN:
        hf_path = config.model.hf_path
        raise ValueError(
            f"sparse training from {hf_path} (sparsity.keep=True), but only "
            f"{100 * sparsity:.1f}% of its target weights are pruned (masks from {source}), "
            f"under the {100 * SPARSE_CHECKPOINT_MIN:.0f}% of a sparse start: it would train "
            f"dense; prune it first (python -m launch.prune --config.model.hf_path={hf_path}), "
            "or set sparsity.keep=False to train it dense on purpose")
    logging.warning("sparse training keeps the masks from %s (%.1f%% of target weights "
                    "pruned)", source, 100 * sparsity)
    return masks


def frozen_masks(config: ml_collections.ConfigDict, params: dict) -> dict | None:
    """The masks a frozen model's adapters are merged under (LoRA), whatever `sparsity.keep`
    says: with it, `loaded_masks` (a dense base refused); without, the base's `masks/` or
    exact zeros, or None for a dense base (adapted densely: no mask to keep)."""
    if keeps_mask(config):
        return loaded_masks(config, params)
    masks, source = _start_masks(config, params)
    sparsity = mask_sparsity(masks)
    if sparsity < SPARSE_CHECKPOINT_MIN:
        return None
    logging.warning("the adapters keep the masks of the frozen model from %s (%.1f%% of "
                    "target weights pruned; sparsity.keep=False)", source, 100 * sparsity)
    return masks


def static_mask_fn(config: ml_collections.ConfigDict) -> Callable[[dict], dict] | None:
    """`params -> masks` for `sparsity.init` (traceable: it runs inside the jitted state
    builder, on the sharded params), or None without a static mask."""
    s = config.get("sparsity")
    if s is None or not s.get("init"):
        return None
    kind, sparsity = s.init, float(s.sparsity)
    key = jax.random.fold_in(jax.random.PRNGKey(config.train.seed), 7)
    logging.warning("sparse training keeps a static %s mask at %.1f%% sparsity", kind,
                    100 * sparsity)
    return lambda params: static_masks(params, kind, sparsity, key)
