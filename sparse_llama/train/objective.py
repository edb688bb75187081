"""The Objective contract: what a train step minimises.

An `Objective` is the one thing that varies between dense training, sparse training,
distillation and sparsity-accelerated training; the step, the loop, checkpoints and export are
the same for all of them (`train/step.py` composes them):

    prepare(params, batch, rng, inputs)          -> step_args      once per step, no gradient
    loss(params, batch, rng, inputs, step_args)  -> (loss_sum, count, terms)   per micro-batch

- `inputs` are the objective's arrays that are not trained (a frozen teacher's params, tables):
  the jitted step takes them as an argument placed with `input_shardings`, so they are never
  constants baked into the compiled program and a 7B teacher is sharded like the student.
- `step_args` (a dict; e.g. the units SAT keeps this step) reach every micro-batch's loss and the
  optax chain as extra arguments of `optimizer.update(..., **step_args)`: a transformation that
  declares them (`optax.GradientTransformationExtraArgs`) sees them, the others ignore them.
- `terms` maps a metric name to `(sum, weight)`; the step adds both over micro-batches and
  reports `sum / weight`, so every term of a composite loss is reported on its own and exactly
  under gradient accumulation and data parallelism.
- State an objective keeps across steps (a schedule position, an rng) lives in an optax
  transformation it adds with `transform(optimizer)`: it is then checkpointed, sharded and
  restored with the optimizer state, and resuming needs nothing new.
- An objective may train arrays that are not the model (`trainable`: LoRA adapters, a soft
  prompt; adapters/objective.py): the state's params are then those arrays (small, replicated),
  the model is one of its frozen `inputs`, and `trainable` says how to create, evaluate and
  export them.
- An objective whose shapes change during training (SAT's ladder of omission rates) names
  static phases (`phase(step)`, `at_phase(name)`); the loop compiles one step per phase, so a
  resumed run lands in the phase of its step.

Builders have the signature `build(config, model, mesh, rules) -> Objective`. The registry of
named builders (`train.objective`) sits above the modules that define them, in
sparse_llama/objectives.py; this contract sits below all of them.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import optax

from sparse_llama.model.config import LlamaConfig
from sparse_llama.model.loss import lm_loss

# loss(params, batch, rng, inputs, step_args) -> (loss_sum, token_count, {name: (sum, weight)})
LossFn = Callable[..., tuple[jax.Array, jax.Array, dict]]
PrepareFn = Callable[..., dict]


def _no_step_args(params, batch, rng, inputs) -> dict:
    del params, batch, rng, inputs
    return {}


def _same_optimizer(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
    return optimizer


def _one_phase(step: int) -> None:
    del step
    return None


class Trainable(NamedTuple):
    """What a step trains when it is not the model (see the module docstring)."""

    init: Callable[[jax.Array], Any]  # key -> the trainable pytree (float32)
    # (trainable, batch, inputs) -> (nll_sum, token_count): the held-out loss of the adapted
    # model, as the LM evaluation measures it
    eval_loss: Callable[..., tuple[jax.Array, jax.Array]]
    # (host trainable, inputs, workdir, tokenizer_dir) -> summary entries (paths written)
    export: Callable[..., dict]


class Objective(NamedTuple):
    """What one train step minimises (see the module docstring)."""

    loss: LossFn
    prepare: PrepareFn = _no_step_args
    inputs: Any = None  # non-trained arrays, passed to the jitted step as an argument
    input_shardings: Any = None  # NamedShardings of `inputs` (None: let jit place them)
    transform: Callable[[optax.GradientTransformation],
                        optax.GradientTransformation] = _same_optimizer
    # Static phases (e.g. SAT's omission-rate rungs: other shapes, another program):
    # `phase(step)` names the phase of an update (hashable; None = the objective itself) and
    # `at_phase(name)` the objective of that phase. The loop compiles one step per phase.
    phase: Callable[[int], Any] = _one_phase
    at_phase: Callable[[Any], "Objective"] | None = None
    trainable: Trainable | None = None  # None: the step trains the model's params

    def for_step(self, step: int) -> "Objective":
        """The objective that update `step` runs (itself unless it has phases)."""
        name = self.phase(step)
        return self if name is None or self.at_phase is None else self.at_phase(name)


def lm_objective(model: LlamaConfig) -> Objective:
    """Next-token cross-entropy over the batch's loss tokens (dense and sparse training: the
    sparse mask is kept by the optimizer, `optim/keep_sparse.py`, not by the loss)."""
    def loss(params, batch, rng, inputs, step_args):
        del rng, inputs, step_args  # deterministic, no frozen inputs
        total, count = lm_loss(params, batch, model)
        return total, count, {}  # the loss is the only term

    return Objective(loss=loss)
