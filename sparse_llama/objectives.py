"""The registry of training objectives: `train.objective` name -> builder and its properties.

It sits above the modules that define objectives (train/objective.py holds the contract and
`lm`; distill/, sat/ and adapters/ the others) and only commands (launch.train, recipes, the
planner, launch.export) import it. A new objective is one module with a builder
`build(config, model, mesh, rules) -> Objective` and one `register(...)` line below.

What a command must know about an objective before building it (building may load a teacher)
is a field of its registration:
- `lora`: `finetune.lora_rank > 0` may wrap it in mask-preserving LoRA adapters;
- `plannable`: `launch.plan` can plan its step exactly without the other models it loads;
- `steps_shape_program`: its compiled steps depend on `train.steps` (SAT's ladder of rungs);
- `exports_model`: its checkpoints hold the model (a soft prompt's hold the prompt only).
"""

from collections.abc import Callable
from typing import NamedTuple

import ml_collections
from jax.sharding import Mesh

from sparse_llama.adapters import objective as adapters
from sparse_llama.distill import objective as distill
from sparse_llama.model.config import LlamaConfig
from sparse_llama.sat import objective as sat
from sparse_llama.train.objective import Objective, lm_objective

Builder = Callable[[ml_collections.ConfigDict, LlamaConfig, Mesh, object], Objective]


class Registered(NamedTuple):
    """One named objective: its builder and what commands must know before building it."""

    build: Builder
    lora: bool = False
    plannable: bool = False
    steps_shape_program: bool = False
    exports_model: bool = True


OBJECTIVES: dict[str, Registered] = {}


def register(name: str, build: Builder, **properties) -> None:
    """Add `name` to the registry (see the module docstring for the properties)."""
    OBJECTIVES[name] = Registered(build, **properties)


def language_model(config: ml_collections.ConfigDict, model: LlamaConfig, mesh: Mesh,
                   rules) -> Objective:
    """The `lm` builder (it reads no config section)."""
    del config, mesh, rules
    return lm_objective(model)


register("lm", language_model, lora=True, plannable=True)
register("distill", distill.build, lora=True)
register("sat", sat.build, plannable=True, steps_shape_program=True)
register("soft_prompt", adapters.soft_prompt_objective, exports_model=False)


def name_of(config: ml_collections.ConfigDict) -> str:
    """`train.objective` (default "lm")."""
    return config.train.get("objective", "lm")


def registered(config: ml_collections.ConfigDict) -> Registered:
    """The registration of the run's objective; ValueError naming the registered ones."""
    name = name_of(config)
    if name not in OBJECTIVES:
        raise ValueError(f"train.objective={name!r} is not one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]


def lora_rank(config: ml_collections.ConfigDict) -> int:
    return (config.get("finetune") or {}).get("lora_rank", 0)


def build(config: ml_collections.ConfigDict, model: LlamaConfig, mesh: Mesh,
          rules) -> Objective:
    """The objective named by `train.objective`, wrapped in LoRA adapters when
    `finetune.lora_rank > 0` (checked before anything loads)."""
    entry = registered(config)
    if lora_rank(config) and not entry.lora:
        wraps = tuple(n for n, e in OBJECTIVES.items() if e.lora)
        raise ValueError(f"finetune.lora_rank={lora_rank(config)} with train.objective="
                         f"{name_of(config)!r}: LoRA wraps only {wraps}; set "
                         "finetune.lora_rank=0")
    lora = adapters.lora_settings(config, model)
    objective = entry.build(config, model, mesh, rules)
    if lora is not None:
        objective = adapters.lora_objective(objective, config, model, mesh, rules, *lora)
    return objective


def trains_the_model(config: ml_collections.ConfigDict) -> str | None:
    """None when the run's checkpoints hold the model, else what they hold instead."""
    if not registered(config).exports_model:
        return "a soft prompt"
    return "LoRA adapters" if lora_rank(config) else None
