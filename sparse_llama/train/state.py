"""The training state pytree and how it is created, placed and described for restoring.

`TrainState` holds everything a step reads and writes: the update count, the params (master
weights in `model.param_dtype`), the optimizer state and a base PRNG key. It is a NamedTuple,
so it is a pytree for `jax.jit`, for sharding trees and for orbax without registration.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Int, UInt32

from sparse_llama.model import llama, sharding
from sparse_llama.model.config import LlamaConfig
from sparse_llama.optim import keep_sparse
from sparse_llama.sparsity.masks import apply_masks


class TrainState(NamedTuple):
    step: Int[Array, ""]  # optimizer updates done so far
    params: dict
    opt_state: optax.OptState
    rng: UInt32[Array, " 2"]  # raw key data: saved and restored like any array


def _keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """(params init key, step key): independent streams from one seed."""
    base = jax.random.PRNGKey(seed)
    return jax.random.fold_in(base, 0), jax.random.fold_in(base, 1)


def create(params: dict, optimizer: optax.GradientTransformation, seed: int,
           masks: dict | None = None) -> TrainState:
    """A fresh state at step 0 around existing params (traceable).

    `masks` replace the ones a keep-sparse optimizer derived from the params' zeros (a mask
    loaded from disk may keep a weight that happens to be zero).
    """
    opt_state = optimizer.init(params)
    if masks is not None:
        opt_state = keep_sparse.set_masks(opt_state, masks)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                      rng=_keys(seed)[1])


def _init_fn(config: LlamaConfig, optimizer, seed: int, param_dtype):
    def init() -> TrainState:
        params = llama.init_params(_keys(seed)[0], config, param_dtype)
        return create(params, optimizer, seed)
    return init


def shardings_for(abstract: TrainState, optimizer: optax.GradientTransformation, mesh: Mesh,
                  rules) -> TrainState:
    """NamedShardings of every state leaf: params and optimizer moments by the logical rules,
    the step and the key replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    param_sh = sharding.param_shardings(abstract.params, mesh, rules)
    opt_sh = sharding.opt_state_shardings(optimizer, abstract.opt_state, param_sh, mesh)
    return TrainState(step=replicated, params=param_sh, opt_state=opt_sh, rng=replicated)


def abstract_state(config: LlamaConfig, optimizer: optax.GradientTransformation, mesh: Mesh,
                   rules, *, param_dtype=jnp.float32) -> TrainState:
    """Shape, dtype and sharding of every state leaf, without allocating (restore target)."""
    shapes = jax.eval_shape(_init_fn(config, optimizer, 0, param_dtype))
    shardings = shardings_for(shapes, optimizer, mesh, rules)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, shardings)


def init_state(config: LlamaConfig, optimizer: optax.GradientTransformation, mesh: Mesh, rules,
               *, seed: int, param_dtype=jnp.float32) -> TrainState:
    """A new model and optimizer state, created directly in its sharded layout.

    `jax.jit(init, out_shardings=...)` materialises each shard on its own device; no host
    ever holds the full params (the big_vision / MaxText pattern).
    """
    init = _init_fn(config, optimizer, seed, param_dtype)
    shardings = shardings_for(jax.eval_shape(init), optimizer, mesh, rules)
    return jax.jit(init, out_shardings=shardings)()


def state_from_params(params: dict, optimizer: optax.GradientTransformation, mesh: Mesh, rules,
                      *, seed: int, param_dtype=jnp.float32, masks: dict | None = None
                      ) -> TrainState:
    """A step-0 state around loaded (host) params, placed in the sharded layout.

    `masks` (host bool arrays) go into a keep-sparse optimizer's state; they are an argument
    of the jitted builder, placed by the params' rules, never a constant of its program.
    """
    params = jax.tree.map(lambda w: np.asarray(w, dtype=param_dtype), params)
    abstract = jax.eval_shape(lambda p: create(p, optimizer, seed), params)
    shardings = shardings_for(abstract, optimizer, mesh, rules)
    placed = sharding.shard(params, shardings.params)
    if masks is None:
        return jax.jit(lambda p: create(p, optimizer, seed), out_shardings=shardings)(placed)
    placed_masks = sharding.shard(masks, sharding.param_shardings(masks, mesh, rules))
    return jax.jit(lambda p, m: create(p, optimizer, seed, m),
                   out_shardings=shardings)(placed, placed_masks)


def masked_state(state: TrainState, optimizer: optax.GradientTransformation, *, seed: int,
                 mask_fn: Callable[[dict], dict]) -> TrainState:
    """A step-0 state whose params are `state.params` masked by `mask_fn(params)` (computed
    on the sharded params, in place) and whose optimizer keeps those masks."""
    shardings = jax.tree.map(lambda a: a.sharding, state)

    def build(params):
        masks = mask_fn(params)
        return create(apply_masks(params, masks), optimizer, seed, masks)

    return jax.jit(build, out_shardings=shardings, donate_argnums=0)(state.params)


def _trainable_init(init: Callable[[jax.Array], dict], optimizer, seed: int):
    def build() -> TrainState:
        return create(init(_keys(seed)[0]), optimizer, seed)
    return build


def abstract_trainable_state(init: Callable[[jax.Array], dict],
                             optimizer: optax.GradientTransformation, mesh: Mesh) -> TrainState:
    """`abstract_state` of a run that trains small arrays that are not the model (LoRA
    adapters, a soft prompt: `Objective.trainable`): every leaf replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    shapes = jax.eval_shape(_trainable_init(init, optimizer, 0))
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                        shapes)


def init_trainable_state(init: Callable[[jax.Array], dict],
                         optimizer: optax.GradientTransformation, mesh: Mesh, *,
                         seed: int) -> TrainState:
    """The step-0 state of such a run (replicated, built in one jitted call)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(_trainable_init(init, optimizer, seed), out_shardings=replicated)()
