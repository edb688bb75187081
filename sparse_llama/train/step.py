"""One jitted, pure training step and its evaluation twin.

`train_step(state, batch[, inputs]) -> (state, metrics)` minimises an objective
(`train/objective.py`; default the dense LM loss) and donates `state`: the old params and optimizer
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

from sparse_llama.model import sharding
from sparse_llama.model.config import LlamaConfig
from sparse_llama.model.loss import lm_loss
from sparse_llama.optim.keep_sparse import find_masks, masked_gradients
from sparse_llama.train import objective as objectives
from sparse_llama.train.objective import Objective
from sparse_llama.train.state import TrainState

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


def _grad_sums(objective: Objective, params: dict, batch: dict, rng: jax.Array, inputs,
               step_args: dict, grad_accum: int):
    """(gradient of the summed loss, summed loss, token count, summed terms) over the batch."""
    def loss(p, mb, key):
        total, count, terms = objective.loss(p, mb, key, inputs, step_args)
        return total, (count, terms)

    grad_fn = jax.value_and_grad(loss, has_aux=True)
    if grad_accum == 1:
        (loss_sum, (count, terms)), grads = grad_fn(params, batch, rng)
        return grads, loss_sum, count, terms

    def micro(carry, xs):
        grads, loss_sum, count, terms = carry
        mb, i = xs
        (mb_loss, (mb_count, mb_terms)), g = grad_fn(params, mb, jax.random.fold_in(rng, i))
        grads = jax.tree.map(lambda a, b: a + b.astype(a.dtype), grads, g)
        terms = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), terms, mb_terms)
        return (grads, loss_sum + mb_loss, count + mb_count, terms), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    mb0 = jax.tree.map(lambda x: x[0], _split_micro(batch, grad_accum))
    term_shapes = jax.eval_shape(lambda: objective.loss(params, mb0, rng, inputs, step_args)[2])
    term_zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), term_shapes)
    init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), term_zeros)
    xs = (_split_micro(batch, grad_accum), jnp.arange(grad_accum))
    (grads, loss_sum, count, terms), _ = jax.lax.scan(micro, init, xs)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    return grads, loss_sum, count, terms


def make_train_step(config: LlamaConfig, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule, *, grad_accum: int = 1,
                    state_shardings: TrainState | None = None,
                    batch_sharding: NamedSharding | None = None,
                    objective: Objective | None = None) -> Callable:
    """The jitted `train_step(state, batch[, inputs]) -> (state, metrics)`, donating `state`.

    `objective` (default: the dense LM loss) says what is minimised (`train/objective.py`);
    pass `objective.inputs` as the third argument when it has any: they are placed with
    `objective.input_shardings`, never baked into the program. The objective gets a per-step
    key, `fold_in(state.rng, state.step)` (micro-batch i: `fold_in(key, i)`), so stochastic
    objectives are reproducible on resume; its `prepare` runs once per step and its step
    arguments reach the loss and `optimizer.update` as extra arguments.

    metrics (float32 scalars, replicated): loss (mean token loss), tokens (counted tokens),
    grad_norm (the global norm that clipping sees, before clipping: with keep-sparse in the
    chain, of the masked gradients, pruned entries 0), lr (the rate this update used),
    param_norm (after it), and each of the objective's terms (`sum / weight` over the whole
    batch).
    """
    if objective is None:
        objective = objectives.lm_objective(config)
    has_inputs = objective.inputs is not None

    def train_step(state: TrainState, batch: dict, *maybe_inputs) -> tuple[TrainState, dict]:
        with sharding.activation_rows(batch_sharding):
            return _train_step(state, batch, *maybe_inputs)

    def _train_step(state: TrainState, batch: dict, *maybe_inputs):
        inputs = maybe_inputs[0] if maybe_inputs else None
        rng = jax.random.fold_in(state.rng, state.step)
        step_args = objective.prepare(state.params, batch, rng, inputs)
        grads, loss_sum, count, terms = _grad_sums(objective, state.params, batch, rng, inputs,
                                                   step_args, grad_accum)
        # max(count, 1): a batch of pure padding gives zero gradients, not NaN.
        scale = 1.0 / jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)
        masks = find_masks(state.opt_state)
        seen = grads if masks is None else masked_gradients(grads, masks)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params, **step_args)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss_sum * scale, "tokens": count,
                   "grad_norm": optax.tree.norm(seen), "lr": schedule(state.step),
                   # Checked by the loop: a finite loss can still leave inf params behind.
                   "param_norm": optax.tree.norm(params)}
        for name, (total, weight) in terms.items():
            metrics[name] = total / jnp.maximum(weight, 1e-30)
        return TrainState(state.step + 1, params, opt_state, state.rng), metrics

    kwargs = {}
    if state_shardings is not None:
        replicated = NamedSharding(batch_sharding.mesh, PartitionSpec())
        in_shardings = (state_shardings, batch_sharding)
        if has_inputs:
            in_shardings += (objective.input_shardings,)
        kwargs = {"in_shardings": in_shardings, "out_shardings": (state_shardings, replicated)}
    return jax.jit(train_step, donate_argnums=0, compiler_options=compiler_options(), **kwargs)


def make_eval_step(config: LlamaConfig, *, param_shardings=None,
                   batch_sharding: NamedSharding | None = None, loss: Callable | None = None,
                   input_shardings=None) -> Callable:
    """The jitted `eval_step(params, batch[, inputs]) -> {"nll_sum", "tokens"}` (float32
    scalars).

    `loss(params, batch, inputs) -> (nll_sum, tokens)` replaces the LM loss of the model's
    params (an objective that trains adapters evaluates the adapted model; pass its frozen
    `inputs` with their `input_shardings`). Perplexity over many batches is
    `exp(sum(nll_sum) / sum(tokens))`.
    """
    def eval_step(params: dict, batch: dict, *maybe_inputs) -> dict:
        if loss is None:
            nll_sum, count = lm_loss(params, batch, config)
        else:
            nll_sum, count = loss(params, batch, maybe_inputs[0] if maybe_inputs else None)
        return {"nll_sum": nll_sum, "tokens": count}

    kwargs = {}
    if param_shardings is not None:
        replicated = NamedSharding(batch_sharding.mesh, PartitionSpec())
        in_shardings = (param_shardings, batch_sharding)
        if input_shardings is not None:
            in_shardings += (input_shardings,)
        kwargs = {"in_shardings": in_shardings, "out_shardings": replicated}
    return jax.jit(eval_step, compiler_options=compiler_options(), **kwargs)
