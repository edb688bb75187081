"""SAT's optax transformation: state of sparsity-accelerated training, and omitted units left
untouched by the step that omitted them.

    optimizer = sat_transform(keep_sparse(chain(clip, adamw)), model, layers=(0, 1))
    updates, state = optimizer.update(grads, state, params,
                                      sat_neuron_idx=n_idx, sat_group_idx=g_idx)

`sat_neuron_idx` (len(layers), k) are the kept MLP channels and `sat_group_idx`
(len(layers), kg) the kept KV groups of the SAT layers this step (the SAT objective's
`prepare` returns them; either may be absent: none of that kind omitted). A unit's weights are
its gate/up columns and down row, or its group's q/k/v columns and o rows.

With `freeze_omitted=True` (default) an omitted unit's weights get a zero update and every
params-shaped leaf of the inner state (Adam's moments, a keep-sparse mask) keeps its old value
there: no moment decay, no weight decay, as if that step had not happened for the unit. Adam's
step count (a non-params leaf) advances for all. With `freeze_omitted=False` the inner chain
runs as in plain training (the zero gradients decay the moments, which still move the weights).
Wrapped around keep-sparse, pruned weights stay exactly 0: their updates are 0 either way.

State: `SatState(count, mlp_kept_steps (L, F), group_kept_steps (L, K), inner_state)`: the
updates done and, per unit, in how many of them it was kept (non-SAT layers count every step),
checkpointed with the optimizer state.
"""

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Bool, Int

from sparse_llama.ground.tree_paths import path_name
from sparse_llama.model.config import LlamaConfig

# Leaves that SAT units own, and the axis (of the (L, in, out) weight) the unit indexes.
_MLP_LEAVES = {"gate_proj": 2, "up_proj": 2, "down_proj": 1}
_ATTN_LEAVES = {"q_proj": 2, "o_proj": 1, "k_proj": 2, "v_proj": 2}


class _Whole:
    """Marks a leaf SAT never freezes (a plain object: a pytree leaf, never an array)."""


_WHOLE = _Whole()


class SatState(NamedTuple):
    count: Int[Array, ""]
    mlp_kept_steps: Int[Array, "l f"]
    group_kept_steps: Int[Array, "l k"]
    inner_state: Any


def kept_units(idx: Int[Array, "m k"] | None, layers: Sequence[int], num_layers: int,
               units: int) -> Bool[Array, "l n"]:
    """(L, units) bool: True where a unit is kept (every unit of a non-SAT layer)."""
    if idx is None:
        return jnp.ones((num_layers, units), bool)
    sat_rows = np.zeros(num_layers, bool)
    sat_rows[list(layers)] = True
    keep = jnp.zeros((num_layers, units), bool)
    keep = keep.at[jnp.asarray(layers)[:, None], idx].set(True)
    return keep | jnp.asarray(~sat_rows)[:, None]


def _leaf_masks(params, keep_f, keep_g, config: LlamaConfig):
    """Params-structured tree: a broadcastable kept mask for SAT's leaves, else _WHOLE."""
    e, g = config.dim_per_head, config.num_heads // config.num_kv_heads
    cols = {"q_proj": g * e, "o_proj": g * e, "k_proj": e, "v_proj": e}

    def mask(path, w):
        name = path_name(path).rsplit("/", 1)[-1]
        if "layers" not in path_name(path) or jnp.ndim(w) != 3:
            return _WHOLE
        if name in _MLP_LEAVES and keep_f is not None:
            axis = _MLP_LEAVES[name]
            return keep_f[:, None, :] if axis == 2 else keep_f[:, :, None]
        if name in _ATTN_LEAVES and keep_g is not None:
            k = jnp.repeat(keep_g, cols[name], axis=1)
            return k[:, None, :] if _ATTN_LEAVES[name] == 2 else k[:, :, None]
        return _WHOLE

    return jax.tree_util.tree_map_with_path(mask, params)


def sat_transform(inner: optax.GradientTransformation, config: LlamaConfig, *,
                  layers: Sequence[int], freeze_omitted: bool = True
                  ) -> optax.GradientTransformationExtraArgs:
    """`inner` (the whole chain, keep-sparse included) with SAT's state and freezing."""
    inner = optax.with_extra_args_support(inner)
    layers = tuple(int(i) for i in layers)
    n, f, k = config.num_layers, config.intermediate_size, config.num_kv_heads

    def init(params):
        return SatState(count=jnp.zeros((), jnp.int32),
                        mlp_kept_steps=jnp.zeros((n, f), jnp.int32),
                        group_kept_steps=jnp.zeros((n, k), jnp.int32),
                        inner_state=inner.init(params))

    def update(updates, state, params=None, *, sat_neuron_idx=None, sat_group_idx=None,
               **extra_args):
        keep_f = None if sat_neuron_idx is None else kept_units(sat_neuron_idx, layers, n, f)
        keep_g = None if sat_group_idx is None else kept_units(sat_group_idx, layers, n, k)
        new, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
        if freeze_omitted and (keep_f is not None or keep_g is not None):
            leaf_masks = _leaf_masks(updates, keep_f, keep_g, config)
            new = jax.tree.map(
                lambda m, u: u if m is _WHOLE else jnp.where(m, u, jnp.zeros((), u.dtype)),
                leaf_masks, new)
            state_masks = optax.tree_map_params(
                inner, lambda _, m: m, inner_state, leaf_masks,
                transform_non_params=lambda v: jax.tree.map(lambda _: _WHOLE, v),
                is_leaf=lambda x: x is _WHOLE)
            inner_state = jax.tree.map(
                lambda m, s, old: s if m is _WHOLE or jnp.ndim(s) == 0 else jnp.where(m, s, old),
                state_masks, inner_state, state.inner_state)
        ones_f = jnp.ones((n, f), bool) if keep_f is None else keep_f
        ones_g = jnp.ones((n, k), bool) if keep_g is None else keep_g
        return new, SatState(count=state.count + 1,
                             mlp_kept_steps=state.mlp_kept_steps + ones_f.astype(jnp.int32),
                             group_kept_steps=state.group_kept_steps + ones_g.astype(jnp.int32),
                             inner_state=inner_state)

    return optax.GradientTransformationExtraArgs(init, update)


def find_sat_state(opt_state) -> SatState | None:
    """The (outermost) SatState in an optimizer state, or None."""
    for node in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, SatState)):
        if isinstance(node, SatState):
            return node
    return None
