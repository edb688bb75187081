"""The SAT objective: score and select the kept units once per step (`prepare`, no gradient),
then forward and backward over the kept units only (`loss`), rung by rung of the ladder.

Registered as `train.objective="sat"` in sparse_llama/objectives.py.

`build(config, model, mesh, rules)` reads `config.sat` (configs/blocks.py `sat()`
documents each key), validates it against the model and `train.steps`, and returns an
`Objective` whose `phase(step)` is the LORS rung of the step and `at_phase(rung)` that rung's
objective (its own static unit counts, hence its own compiled step). `transform` wraps the
run's optimizer in `optim/sat.sat_transform`, which holds SAT's state and freezes omitted
units. Step arguments: `sat_neuron_idx` (len(layers), k) kept MLP channels and
`sat_group_idx` (len(layers), kg) kept KV groups, each present only when that kind omits
units at this rung. Metrics: `sat_mlp_rate` and `sat_head_rate`, the fractions of the SAT
layers' channels and groups that the step omitted.

Randomness: the step's key is `fold_in(state.rng, state.step)` (train/step.py); selection
draws from `fold_in(key, 0x5A7)`, so a resumed run selects exactly the units an uninterrupted
run would.
"""

import dataclasses
import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from sparse_llama.ground.sections import spec_from_section
from sparse_llama.model import llama
from sparse_llama.model.config import LlamaConfig
from sparse_llama.model.loss import token_nll
from sparse_llama.optim.sat import sat_transform
from sparse_llama.sat import schedule, scores, selection
from sparse_llama.train.objective import Objective

_SAT_TAG = 0x5A7

@dataclasses.dataclass(frozen=True)
class LorsSection:
    """`sat.lors`: the ladder back to dense."""

    constant_fraction: float
    rungs: int


@dataclasses.dataclass(frozen=True)
class SatSection:
    """`sat` (defaults and what each key means: configs/blocks.py `sat()`)."""

    metric: str
    selection: str
    temperature: float
    normalize: str
    mlp_rate: float
    head_rate: float
    layers: str | tuple
    freeze_omitted: bool
    score_fraction: float
    score_len: int
    lors: ml_collections.ConfigDict | dict


class Plan(NamedTuple):
    """Everything static about a SAT run (validated)."""

    metric: str
    selection: str
    temperature: float
    normalize: str
    layers: tuple[int, ...]
    freeze_omitted: bool
    score_fraction: float
    score_len: int
    ladder: schedule.Ladder


def parse_layers(value, num_layers: int) -> tuple[int, ...]:
    """`"all"`, `"0,2,5"` (commas; `a-b` ranges inclusive) or a list of ints -> sorted ids."""
    if isinstance(value, str):
        text = value.strip()
        if text in ("", "all"):
            return tuple(range(num_layers))
        ids = []
        try:
            for part in text.split(","):
                if "-" in part.strip()[1:]:
                    lo, hi = part.split("-", 1)
                    ids.extend(range(int(lo), int(hi) + 1))
                else:
                    ids.append(int(part))
        except ValueError:
            raise ValueError(f"sat.layers={value!r} is not 'all' or comma-separated block "
                             "indices (e.g. '0,1' or '2-5')") from None
    else:
        ids = [int(i) for i in value]
    bad = [i for i in ids if not 0 <= i < num_layers]
    if bad or not ids:
        raise ValueError(f"sat.layers={value!r} names blocks {bad or 'none'} outside the model's "
                         f"{num_layers} blocks; use indices 0..{num_layers - 1} or 'all'")
    return tuple(sorted(set(ids)))


def make_plan(sat, model: LlamaConfig, total_steps: int) -> Plan:
    """The validated plan of `config.sat`; a one-line ValueError naming the key otherwise."""
    sat = spec_from_section(SatSection, sat, "sat", home="blocks.sat()")
    metric, sel = sat.metric, sat.selection
    if metric not in scores.METRICS:
        raise ValueError(f"sat.metric={metric!r} is not one of {scores.METRICS}")
    if sel not in selection.SELECTIONS:
        raise ValueError(f"sat.selection={sel!r} is not one of {selection.SELECTIONS}")
    norm = sat.normalize
    if norm not in selection.NORMALIZATIONS:
        raise ValueError(f"sat.normalize={norm!r} is not one of {selection.NORMALIZATIONS}")
    temperature = sat.temperature
    if not isinstance(temperature, int | float) or not temperature > 0:
        raise ValueError(f"sat.temperature={temperature!r} must be a positive number "
                         "(the paper's default is 0.05)")
    rates = {}
    for key, units, what in (("mlp_rate", model.intermediate_size, "MLP channels"),
                             ("head_rate", model.num_kv_heads, "KV groups")):
        r = getattr(sat, key)
        if not isinstance(r, int | float) or not 0 <= r < 1:
            raise ValueError(f"sat.{key}={r!r} must be in [0, 1) (the fraction of units "
                             "omitted each step)")
        rates[key] = float(r)
        if schedule.kept_count(r, units) < 1:
            raise ValueError(f"sat.{key}={r} leaves no {what} of the model's {units} in a "
                             f"layer; lower it below {1 - 1 / units:.4g}")
    groups = rates["head_rate"] * model.num_kv_heads
    if abs(groups - round(groups)) > 1e-6:
        g = model.num_heads // model.num_kv_heads
        raise ValueError(
            f"sat.head_rate={rates['head_rate']} omits {groups:.3g} of the model's "
            f"{model.num_kv_heads} KV groups ({g} query head(s) each, kept or omitted "
            f"together); use a multiple of 1/{model.num_kv_heads}")
    layers = parse_layers(sat.layers, model.num_layers)
    if model.scan_layers and len(layers) < model.num_layers:
        raise ValueError(f"sat.layers={sat.layers!r} omits units in only some blocks, "
                         "which needs the unrolled blocks: set model.scan_layers=0 or "
                         "sat.layers='all'")
    lors = spec_from_section(LorsSection, sat.lors, "sat.lors")
    frac, rungs = lors.constant_fraction, lors.rungs
    if not isinstance(frac, int | float) or not 0 <= frac <= 1:
        raise ValueError(f"sat.lors.constant_fraction={frac!r} must be in [0, 1] "
                         "(1 keeps the rates to the end)")
    if not isinstance(rungs, int) or isinstance(rungs, bool) or rungs < 1:
        raise ValueError(f"sat.lors.rungs={rungs!r} must be an integer >= 1 (the last rung "
                         "is dense)")
    frac_rows, score_len = sat.score_fraction, sat.score_len
    if not isinstance(frac_rows, int | float) or not 0 < frac_rows <= 1:
        raise ValueError(f"sat.score_fraction={frac_rows!r} must be in (0, 1] (the share of "
                         "the batch's rows the scores are computed from)")
    if not isinstance(score_len, int) or score_len < 0:
        raise ValueError(f"sat.score_len={score_len!r} must be an integer >= 0 (0: whole rows)")
    freeze = sat.freeze_omitted
    if not isinstance(freeze, bool):
        raise ValueError(f"sat.freeze_omitted={freeze!r} must be True or False")
    ladder = schedule.Ladder.make(rates["mlp_rate"], rates["head_rate"], int(total_steps),
                                  float(frac), rungs)
    return Plan(metric, sel, float(temperature), norm, layers, freeze, float(frac_rows),
                score_len, ladder)


def rung_counts(plan: Plan, model: LlamaConfig, rung: int) -> tuple[int, int]:
    """(kept MLP channels, kept KV groups) per SAT layer at `rung`."""
    mlp_rate, head_rate = plan.ladder.rates(rung)
    return (schedule.kept_count(mlp_rate, model.intermediate_size),
            schedule.kept_count(head_rate, model.num_kv_heads))


def select_units(plan: Plan, model: LlamaConfig, params: dict, batch: dict, key: jax.Array,
                 rung: int) -> dict:
    """The step arguments of `rung`: the kept units of every SAT layer (no gradient)."""
    kf, kg = rung_counts(plan, model, rung)
    do_mlp, do_heads = kf < model.intermediate_size, kg < model.num_kv_heads
    if not (do_mlp or do_heads):
        return {}
    sub = scores.subsample(batch, plan.score_fraction, plan.score_len)
    mlp_s, group_s = scores.unit_scores(plan.metric, params, sub, model)
    rows = jnp.asarray(plan.layers)
    # Uniform scores are all equal: its selection is always a uniformly random subset.
    how = "sampling" if plan.metric == "uniform" else plan.selection
    key = jax.random.fold_in(key, _SAT_TAG)
    out = {}
    if do_mlp:
        out["sat_neuron_idx"] = selection.select(
            mlp_s[rows], kf, jax.random.fold_in(key, 0), selection=how,
            temperature=plan.temperature, normalization=plan.normalize)
    if do_heads:
        out["sat_group_idx"] = selection.select(
            group_s[rows], kg, jax.random.fold_in(key, 1), selection=how,
            temperature=plan.temperature, normalization=plan.normalize)
    return jax.lax.stop_gradient(out)


def _per_layer(idx, layers: Sequence[int], num_layers: int):
    """Stacked idx of all layers, or a per-layer list (None = dense) for a subset."""
    if idx is None or len(layers) == num_layers:
        return idx
    row = {layer: j for j, layer in enumerate(layers)}
    return [idx[row[i]] if i in row else None for i in range(num_layers)]


def rung_objective(plan: Plan, model: LlamaConfig, rung: int, transform, phase) -> Objective:
    kf, kg = rung_counts(plan, model, rung)
    mlp_rate = 1.0 - kf / model.intermediate_size
    head_rate = 1.0 - kg / model.num_kv_heads

    def prepare(params, batch, rng, inputs):
        del inputs
        return select_units(plan, model, params, batch, rng, rung)

    def loss(params, batch, rng, inputs, step_args):
        del rng, inputs
        n_idx = _per_layer(step_args.get("sat_neuron_idx"), plan.layers, model.num_layers)
        g_idx = _per_layer(step_args.get("sat_group_idx"), plan.layers, model.num_layers)
        logits = llama.forward(params, batch["inputs"], model, positions=batch["positions"],
                               segment_ids=batch["segment_ids"], neuron_idx=n_idx,
                               group_idx=g_idx)
        weights = batch["loss_mask"].astype(jnp.float32)
        nll = token_nll(logits, batch["targets"])
        one = jnp.ones((), jnp.float32)
        terms = {"sat_mlp_rate": (one * mlp_rate, one), "sat_head_rate": (one * head_rate, one)}
        return jnp.sum(jnp.where(weights > 0, nll * weights, 0.0)), jnp.sum(weights), terms

    return Objective(loss=loss, prepare=prepare, transform=transform, phase=phase,
                     at_phase=None)


def objective_from_plan(plan: Plan, model: LlamaConfig) -> Objective:
    """The SAT objective of a validated plan (see the module docstring)."""
    def transform(optimizer):
        return sat_transform(optimizer, model, layers=plan.layers,
                             freeze_omitted=plan.freeze_omitted)

    phase = plan.ladder.rung

    @functools.cache
    def at_phase(rung: int) -> Objective:
        return rung_objective(plan, model, int(rung), transform, phase)

    return at_phase(0)._replace(at_phase=at_phase)


def build(config: ml_collections.ConfigDict, model: LlamaConfig, mesh: Mesh,
          rules) -> Objective:
    """The `sat` builder: `config.sat` validated against the model and `train.steps`."""
    del mesh, rules  # the kept indices are small and replicated; weights keep their layouts
    sat = config.get("sat")
    plan = make_plan(sat, model, int(config.train.steps))
    return objective_from_plan(plan, model)
