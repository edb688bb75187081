"""Objectives: what a train step minimises, as a registry of builders.

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
  prompt; train/adapters.py): the state's params are then those arrays (small, replicated),
  the model is one of its frozen `inputs`, and `trainable` says how to create, evaluate and
  export them.
- An objective whose shapes change during training (SAT's ladder of omission rates) names
  static phases (`phase(step)`, `at_phase(name)`); the loop compiles one step per phase, so a
  resumed run lands in the phase of its step.

`finetune.lora_rank > 0` wraps the named objective (lm or distill) so that it trains
mask-preserving LoRA adapters of the frozen model instead of the model itself.

Builders have the signature `build(config, model, mesh, rules) -> Objective`, registered by name
in `OBJECTIVES`; the run config picks one with `train.objective`.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import ml_collections
import optax
from jax.sharding import Mesh

from sparse_llama.model.config import LlamaConfig
from sparse_llama.train.loss import lm_loss

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


def language_model(config: ml_collections.ConfigDict, model: LlamaConfig, mesh: Mesh,
                   rules) -> Objective:
    """The `lm` builder (it reads no config section)."""
    del config, mesh, rules
    return lm_objective(model)


def distillation(config: ml_collections.ConfigDict, model: LlamaConfig, mesh: Mesh,
                 rules) -> Objective:
    """The `distill` builder: CE + logit KD + SquareHead from the frozen teacher of the
    `distill` section (sparse_llama/distill/objective.py, docs/distill.md)."""
    from sparse_llama.distill import objective as distill  # late: it imports this module

    return distill.build(config, model, mesh, rules)


def sparsity_accelerated(config: ml_collections.ConfigDict, model: LlamaConfig, mesh: Mesh,
                         rules) -> Objective:
    """The `sat` builder: each step trains only the sampled MLP channels and KV groups of the
    `sat` section, with the ladder back to dense (sparse_llama/sat/objective.py, docs/sat.md)."""
    from sparse_llama.sat import objective as sat  # late: it imports this module

    return sat.build(config, model, mesh, rules)


def soft_prompt(config: ml_collections.ConfigDict, model: LlamaConfig, mesh: Mesh,
                rules) -> Objective:
    """The `soft_prompt` builder: N learned embeddings before every input, the model frozen
    (MediSwift; sparse_llama/train/adapters.py, docs/distill.md)."""
    from sparse_llama.train import adapters  # late: it imports this module

    return adapters.soft_prompt_objective(config, model, mesh, rules)


OBJECTIVES: dict[str, Callable[..., Objective]] = {
    "lm": language_model,
    "distill": distillation,
    "sat": sparsity_accelerated,
    "soft_prompt": soft_prompt,
}


def build(config: ml_collections.ConfigDict, model: LlamaConfig, mesh: Mesh,
          rules) -> Objective:
    """The objective named by `train.objective` (default "lm")."""
    name = config.train.get("objective", "lm")
    if name not in OBJECTIVES:
        raise ValueError(f"train.objective={name!r} is not one of {sorted(OBJECTIVES)}")
    from sparse_llama.train import adapters  # late: it imports this module

    lora = adapters.lora_settings(config, model, name)  # checked before anything loads
    objective = OBJECTIVES[name](config, model, mesh, rules)
    if lora is not None:  # `finetune.lora_rank > 0`: adapters on the frozen model
        objective = adapters.lora_objective(objective, config, model, mesh, rules, *lora)
    return objective
