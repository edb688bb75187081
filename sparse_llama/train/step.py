"""One jitted, pure training step and its evaluation twin.

`train_step(state, batch) -> (state, metrics)` donates `state`: the old params and optimizer
moments are overwritten in place, so a step needs one copy of the state, not two. With
`grad_accum = k` the batch is split into k micro-batches inside the step (a `lax.scan`), their
gradient sums are added and divided once by the total token count: the update is the one a
single k-times-larger batch would give (up to float summation order).

Mixed precision needs nothing here: `config.dtype` is the compute dtype (params are cast at
use, logits and the loss are float32) and the params keep `model.param_dtype` (float32 master
weights), so gradients and optimizer moments are float32.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec
from jaxtyping import Array, Float

from sparse_llama.model.config import LlamaConfig
from sparse_llama.train.loss import lm_loss
from sparse_llama.train.state import TrainState

# loss_fn(params, batch, rng) -> (sum of token losses, token count)
LossFn = Callable[[dict, dict, jax.Array], tuple[Float[Array, ""], Float[Array, ""]]]

# XLA:CPU hands dots and reductions to YNNPACK but keeps elementwise fusions its own: with
# YNNPACK's elementwise fusions (on by default in jax 0.10) the backward of SwiGLU writes its
# outputs transposed for the next library call, a strided copy that cost ~15% of an m25 step
# (benchmarks/train_step.py measures it). No effect on other backends.
_CPU_COMPILER_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


@functools.cache
def compiler_options() -> dict:
    """The XLA options the train and eval steps compile with ({} off CPU, or when this
    jaxlib does not know them)."""
    if jax.default_backend() != "cpu":
        return {}
    try:
        jax.jit(lambda x: x + 1, compiler_options=_CPU_COMPILER_OPTIONS).lower(1.0).compile()
    except Exception:  # an older or newer XLA without the option: run with its defaults
        return {}
    return dict(_CPU_COMPILER_OPTIONS)


def _split_micro(batch: dict, k: int) -> dict:
    """(B, ...) -> (k, B/k, ...) with micro-batch j = rows j, j+k, j+2k, ...

    Strided, not contiguous: each device's rows of a batch-sharded array stay on that device.
    """
    def split(x):
        x = x.reshape(x.shape[0] // k, k, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)
    return jax.tree.map(split, batch)


def _grad_sums(loss_fn: LossFn, params: dict, batch: dict, rng: jax.Array, grad_accum: int):
    """(gradient of the summed loss, summed loss, token count) over the whole batch."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if grad_accum == 1:
        (loss_sum, count), grads = grad_fn(params, batch, rng)
        return grads, loss_sum, count

    def micro(carry, xs):
        grads, loss_sum, count = carry
        mb, i = xs
        (mb_loss, mb_count), g = grad_fn(params, mb, jax.random.fold_in(rng, i))
        grads = jax.tree.map(lambda a, b: a + b.astype(a.dtype), grads, g)
        return (grads, loss_sum + mb_loss, count + mb_count), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    xs = (_split_micro(batch, grad_accum), jnp.arange(grad_accum))
    (grads, loss_sum, count), _ = jax.lax.scan(micro, init, xs)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    return grads, loss_sum, count


def make_train_step(config: LlamaConfig, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule, *, grad_accum: int = 1,
                    state_shardings: TrainState | None = None,
                    batch_sharding: NamedSharding | None = None,
                    loss_fn: LossFn | None = None) -> Callable:
    """The jitted `train_step(state, batch) -> (state, metrics)`, donating `state`.

    metrics (float32 scalars, replicated): loss (mean token NLL), tokens (counted tokens),
    grad_norm (before clipping), lr (the rate this update used), param_norm (after it).
    `loss_fn` replaces the dense LM loss (sparse or distillation training); it gets a per-step
    key, `fold_in(state.rng, state.step)`, so stochastic losses are reproducible on resume.
    """
    if loss_fn is None:
        def loss_fn(params, batch, rng):
            del rng  # the dense loss is deterministic
            return lm_loss(params, batch, config)

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(state.rng, state.step)
        grads, loss_sum, count = _grad_sums(loss_fn, state.params, batch, rng, grad_accum)
        # max(count, 1): a batch of pure padding gives zero gradients, not NaN.
        scale = 1.0 / jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss_sum * scale, "tokens": count,
                   "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step),
                   # Checked by the loop: a finite loss can still leave inf params behind.
                   "param_norm": optax.tree.norm(params)}
        return TrainState(state.step + 1, params, opt_state, state.rng), metrics

    kwargs = {}
    if state_shardings is not None:
        replicated = NamedSharding(batch_sharding.mesh, PartitionSpec())
        kwargs = {"in_shardings": (state_shardings, batch_sharding),
                  "out_shardings": (state_shardings, replicated)}
    return jax.jit(train_step, donate_argnums=0, compiler_options=compiler_options(), **kwargs)


def make_eval_step(config: LlamaConfig, *, param_shardings=None,
                   batch_sharding: NamedSharding | None = None) -> Callable:
    """The jitted `eval_step(params, batch) -> {"nll_sum", "tokens"}` (float32 scalars).

    Perplexity over many batches is `exp(sum(nll_sum) / sum(tokens))`.
    """
    def eval_step(params: dict, batch: dict) -> dict:
        nll_sum, count = lm_loss(params, batch, config)
        return {"nll_sum": nll_sum, "tokens": count}

    kwargs = {}
    if param_shardings is not None:
        replicated = NamedSharding(batch_sharding.mesh, PartitionSpec())
        kwargs = {"in_shardings": (param_shardings, batch_sharding),
                  "out_shardings": replicated}
    return jax.jit(eval_step, compiler_options=compiler_options(), **kwargs)
