"""Static masks chosen without data: random or magnitude, at a given sparsity per matrix.

SPDF (arXiv 2303.10464) pretrains from scratch with a fixed unstructured mask chosen at
initialisation; these build it. Each matrix of each decoder block (one slice of a stacked
`(L, in, out)` leaf) loses exactly `round(sparsity * in * out)` entries, so every layer has the
requested sparsity, not just the average. Only the target tensors get masks; the rest keep
the 0-d `True` of `masks.dense_masks`. Masks: True = kept.
"""

import jax
import jax.numpy as jnp

from sparse_llama.ground.tree_paths import path_name
from sparse_llama.sparsity.masks import DEFAULT_TARGETS, is_target
from sparse_llama.sparsity.selection import count_for, mask_smallest

STATIC_KINDS = ("random", "magnitude")


def _per_matrix(scores: jax.Array, sparsity: float) -> jax.Array:
    """Keep-mask pruning the smallest scores of every trailing 2-D matrix."""
    batch_dims = scores.ndim - 2
    k = count_for(sparsity, scores.shape[-1] * scores.shape[-2])
    return mask_smallest(scores, k, batch_dims=batch_dims)


def static_masks(params: dict, kind: str, sparsity: float, key: jax.Array,
                 targets=DEFAULT_TARGETS) -> dict:
    """Masks of the params' structure: `kind` "random" (uniform scores from `key`, one stream
    per leaf) or "magnitude" (|w|: the smallest weights of each matrix are pruned)."""
    if kind not in STATIC_KINDS:
        raise ValueError(f"static mask kind {kind!r} is not one of {STATIC_KINDS}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"static mask sparsity must be in [0, 1), got {sparsity}")
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(key, len(leaves))
    out = []
    for (path, w), k in zip(leaves, keys, strict=True):
        if not is_target(path_name(path), targets):
            out.append(jnp.ones((), jnp.bool_))
            continue
        scores = (jax.random.uniform(k, w.shape) if kind == "random"
                  else jnp.abs(w.astype(jnp.float32)))
        out.append(_per_matrix(scores, sparsity))
    return jax.tree_util.tree_unflatten(treedef, out)
