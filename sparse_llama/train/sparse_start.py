"""Which mask a training run keeps, decided once before its first step (`sparsity` section).

- `sparsity.keep=True` starting from `model.hf_path` (a `launch.prune` output or an earlier
  sparse run's export): the masks from `sparsity.masks_path`, else `<hf_path>/masks` when it
  exists, else the checkpoint's exact zeros in the target tensors. The log says which. A mask
  whose tree or shapes do not fit the model, or a checkpoint whose pruned positions are not
  zero, is refused before any step.
- `sparsity.init="random"|"magnitude"` with `sparsity.sparsity=S`: a static mask chosen at the
  start (SPDF pretrains from scratch this way), applied to the initial or loaded weights.
- `sparsity.keep=False` (dense training) from a checkpoint whose target tensors hold >= 10%
  exact zeros: a warning that the run will make it dense, naming configs/sparse.py and
  configs/spdf.py, unless `sparsity.release=True` says that is the plan (SPDF's dense stage).

The masks themselves then live in the optimizer state (`optim/keep_sparse.py`).
"""

import os
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from absl import logging

from sparse_llama.ground.tree_paths import path_name
from sparse_llama.sparse_io import mask_io
from sparse_llama.sparsity import masks as masks_lib
from sparse_llama.sparsity.static import STATIC_KINDS, static_masks

# A dense run from a checkpoint at least this sparse warns that it will densify it.
DENSIFY_WARNING_SPARSITY = 0.10


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


def loaded_masks(config: ml_collections.ConfigDict, params: dict) -> dict | None:
    """The masks a run from `model.hf_path` keeps (None for a dense run); checks and logs."""
    s = config.get("sparsity") or ml_collections.ConfigDict({"keep": False})
    if not s.get("keep", False):
        sparsity = target_sparsity(params)
        if sparsity >= DENSIFY_WARNING_SPARSITY and not s.get("release", False):
            logging.warning(
                "model.hf_path=%s has %.1f%% exact zeros in its target tensors, and this dense "
                "run will train them back to nonzero values; to keep the mask use "
                "configs/sparse.py (sparsity.keep=True), to release it on purpose "
                "configs/spdf.py (sparsity.release=True)", config.model.hf_path,
                100 * sparsity)
        return None
    if s.get("init"):
        return None  # a static mask is chosen on the loaded weights (`static_mask_fn`)
    default = os.path.join(config.model.hf_path, "masks")
    path = s.get("masks_path") or (default if os.path.isdir(default) else "")
    if path:
        masks = mask_io.load_masks(path, params)
        source = path
    else:
        masks = masks_lib.masks_from_zeros(params)
        source = f"the exact zeros of {config.model.hf_path}"
    masks = jax.tree.map(lambda m: np.asarray(m, bool), masks)
    _check_zeros_where_pruned(params, masks, source)
    logging.warning("sparse training keeps the masks from %s (%.1f%% of target weights "
                    "pruned)", source, 100 * target_sparsity(params))
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
