"""Masks as pytrees with exactly the params' structure.

A mask leaf is a bool array. Targeted (prunable) tensors get a mask of the weight's shape; every
other leaf gets a 0-d `True`, which broadcasts in `w * mask`, costs nothing to store and keeps
the two trees identical so one `jax.tree.map` applies, combines or shards them.

One polarity everywhere in the project: True = kept, False = pruned (the weight is an exact
zero). Every public function that takes or returns a mask, here and in `sparse_llama.pruning`,
follows it.

One axis for N:M groups: the reduction (input) axis of a linear, i.e. the m consecutive inputs
that one output sums over (what 2:4 sparse tensor cores need). The model stores linear weights
(in, out), stacked (L, in, out), so the groups run along axis -2 (`NM_AXIS_STORED`); Hugging
Face and the pruning solvers' `prune_layer` use (out, in), where they run along axis -1
(`NM_AXIS_HF`). `docs/algorithms.md`, "Masks", says the same.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sparse_llama.ground import param_table
from sparse_llama.ground.tree_paths import path_name

# N:M groups run along the input axis: -2 of the model's (in, out) / (L, in, out) leaves, -1 of
# the (out, in) weights the solvers and Hugging Face use.
NM_AXIS_STORED = -2
NM_AXIS_HF = -1

# Prunable tensors by path suffix (default target spec: `docs/algorithms.md`, "Calibration and
# the sequential driver": q/k/v/o and gate/up/down; embeddings, norms and lm_head stay dense).
DEFAULT_TARGETS = param_table.PRUNABLE


def is_target(name: str, targets: Sequence[str] = DEFAULT_TARGETS) -> bool:
    return name.rsplit("/", 1)[-1] in targets


def dense_masks(params, targets: Sequence[str] = DEFAULT_TARGETS):
    """All-True masks: full-shape for targeted tensors, 0-d for the rest."""
    def make(path, w):
        if is_target(path_name(path), targets):
            return jnp.ones(w.shape, jnp.bool_)
        return jnp.ones((), jnp.bool_)
    return jax.tree_util.tree_map_with_path(make, params)


def masks_from_zeros(params, targets: Sequence[str] = DEFAULT_TARGETS):
    """Masks that keep exactly the nonzero entries of the targeted tensors."""
    def make(path, w):
        if is_target(path_name(path), targets):
            return w != 0
        return jnp.ones((), jnp.bool_)
    return jax.tree_util.tree_map_with_path(make, params)


def check_masks(params, masks) -> None:
    """Raise ValueError naming the first leaf whose mask does not fit its param."""
    p_leaves, p_def = jax.tree_util.tree_flatten_with_path(params)
    m_leaves, m_def = jax.tree_util.tree_flatten_with_path(masks)
    if p_def != m_def:
        p_names = {path_name(p) for p, _ in p_leaves}
        m_names = {path_name(p) for p, _ in m_leaves}
        raise ValueError(
            "mask tree does not match the params tree: missing "
            f"{sorted(p_names - m_names)[:5]}, unexpected {sorted(m_names - p_names)[:5]}; "
            "build masks with sparse_llama.sparsity.masks.dense_masks(params)")
    for (path, w), (_, m) in zip(p_leaves, m_leaves, strict=True):
        if m.dtype != jnp.bool_:
            raise ValueError(f"mask {path_name(path)} has dtype {m.dtype}; masks must be bool")
        if m.shape not in ((), w.shape):
            raise ValueError(f"mask {path_name(path)} has shape {m.shape} but the weight has "
                             f"shape {w.shape}; a mask is either the weight's shape or 0-d")


def apply_masks(params, masks):
    """`w * mask` on every leaf (pruned entries become exact zeros, dtype kept)."""
    return jax.tree.map(lambda w, m: jnp.where(m, w, jnp.zeros((), w.dtype)), params, masks)


def combine_masks(old, new):
    """Keep an entry only where both masks keep it (extending 50% to 70% keeps old zeros)."""
    return jax.tree.map(jnp.logical_and, old, new)


def check_nm(mask: np.ndarray | jax.Array, n: int, m: int, *, axis: int) -> bool:
    """True when every group of m consecutive entries along `axis` has at least n pruned
    (False) entries. `axis` has no default: pass `NM_AXIS_STORED` for the model's (in, out)
    leaves or `NM_AXIS_HF` for (out, in) weights (a default silently checked the wrong axis)."""
    mask = np.moveaxis(np.asarray(mask), axis, -1)
    if mask.shape[-1] % m:
        return False
    groups = mask.reshape(*mask.shape[:-1], mask.shape[-1] // m, m)
    return bool(np.all((~groups).sum(-1) >= n))
