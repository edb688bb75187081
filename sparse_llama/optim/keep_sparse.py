"""Keep-sparse: an optax wrapper after whose every update the pruned weights are exactly 0.

Wrap any optax transformation (the whole chain: clipping, AdamW, schedules) and its pruned
weights stay pruned, with no second "apply the mask" call for a trainer to forget:

    from sparse_llama.optim.keep_sparse import keep_sparse
    optimizer = keep_sparse(optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3)))
    opt_state = optimizer.init(params)  # masks: False where q/k/v/o/gate/up/down are 0
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)  # pruned weights are still exactly 0.0

The masks (True = kept) live in the optimizer state, `KeepSparseState(masks, inner_state)`, so
they are checkpointed, restored and sharded with it (`model/sharding.opt_state_shardings`
gives them their params' layouts). `init` derives them from the zeros of the targeted tensors
(`sparsity.masks.masks_from_zeros`); `set_masks(opt_state, masks)` puts any other masks in,
e.g. `jax.jit(lambda p, m: set_masks(optimizer.init(p), m))(params, masks)` so the masks are
arguments of the program, not constants compiled into it.

One update, per leaf with a full-shape mask:
  1. gradients of pruned entries are set to 0 *before* the inner transformation
     (`masked_gradients`), so global-norm clipping measures only the kept weights' gradients
     (the train step reports that norm as `grad_norm`) and Adam's moments of pruned entries
     stay exactly 0 (they start at 0 and only ever see 0);
  2. the inner transformation runs unchanged (extra args are forwarded to it);
  3. the updates of pruned entries become `-params`, so `params + updates` is exactly +0.0
     there whatever the inner transformation did (weight decay, a schedule, momentum from a
     state made before the mask): IEEE addition gives `w + (-w) = +0.0` for every finite w,
     including w = 0.0 and w = -0.0, so the new weights never hold -0.0 (the *updates* may be
     -0.0 there; `0.0 == -0.0` anyway).
That is one `jnp.where` per leaf on each side of the inner update. A 0-d mask leaf (embeddings,
norms, `lm_head` in the default target spec) means "dense" and is skipped at trace time, by its
shape only (its value may be a traced array, and is ignored: a 0-d mask cannot prune).

`set_masks` does not touch the inner state: moments of entries that the new masks prune are
left as they are (they no longer reach the weights, step 3). Build states with
`set_masks(optimizer.init(params), masks)`, whose moments are all 0, to also keep the moments
exactly 0 from the first step.
"""

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jaxtyping import PyTree

from sparse_llama.sparsity.masks import DEFAULT_TARGETS, masks_from_zeros


class KeepSparseState(NamedTuple):
    masks: Any  # bool pytree of the params' structure: full-shape (True = kept) or 0-d
    inner_state: Any  # the wrapped transformation's state


def _is_state(x) -> bool:
    return isinstance(x, KeepSparseState)


def masked_gradients(grads: PyTree, masks: PyTree) -> PyTree:
    """`grads` with the pruned entries' set to 0: what keep-sparse hands its inner chain
    (clipping included), and what the train step reports the norm of."""
    # Shape, not value, decides: a 0-d mask is dense, and skipping it costs nothing.
    return jax.tree.map(
        lambda g, m: g if jnp.ndim(m) == 0 else jnp.where(m, g, jnp.zeros((), g.dtype)),
        grads, masks)


def keep_sparse(inner: optax.GradientTransformation,
                targets: Sequence[str] = DEFAULT_TARGETS
                ) -> optax.GradientTransformationExtraArgs:
    """`inner` wrapped so that pruned weights, their gradients and their moments stay 0.

    `targets`: the names (last path component) of the prunable tensors whose zeros `init`
    turns into masks; every other leaf gets a 0-d True mask (never pruned).
    """
    targets = tuple(targets)
    inner = optax.with_extra_args_support(inner)

    def init(params):
        # optax.tree_map_params calls init with a leafless placeholder: masks_from_zeros maps
        # it to itself, so the masks are recognised there as a params-shaped subtree.
        return KeepSparseState(masks=masks_from_zeros(params, targets),
                               inner_state=inner.init(params))

    def update(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError("keep_sparse needs the params in update(grads, state, params) "
                             "to set the pruned weights to exactly 0")
        masks = state.masks
        grads = masked_gradients(updates, masks)
        new, inner_state = inner.update(grads, state.inner_state, params, **extra_args)
        # -p, not a cast of it: w + (-w) is exactly 0 only at w's own precision (a bf16 update
        # for an f32 weight would leave a residue); jnp.where promotes instead.
        new = jax.tree.map(
            lambda u, p, m: u if jnp.ndim(m) == 0 else jnp.where(m, u, -p), new, params, masks)
        return new, KeepSparseState(masks=masks, inner_state=inner_state)

    return optax.GradientTransformationExtraArgs(init, update)


def set_masks(opt_state: PyTree, masks: PyTree) -> PyTree:
    """`opt_state` with the masks of every KeepSparseState inside replaced by `masks`.

    Works through any nesting (chain tuples, NamedTuples, dicts, a keep_sparse inside another).
    The inner states are kept as they are (see the module docstring about moments).
    """
    def replace(node):
        if not _is_state(node):
            return node
        return KeepSparseState(masks=masks, inner_state=set_masks(node.inner_state, masks))
    return jax.tree.map(replace, opt_state, is_leaf=_is_state)


def find_masks(opt_state: PyTree) -> PyTree | None:
    """The masks of the first (outermost, then leftmost) KeepSparseState in `opt_state`, or
    None when there is none."""
    for node in jax.tree.leaves(opt_state, is_leaf=_is_state):
        if _is_state(node):
            return node.masks
    return None
