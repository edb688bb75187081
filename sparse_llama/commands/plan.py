"""`launch.plan`: what a training run needs per device, from the compiler, before paying for it.

For a training config (or every training stage of a recipe) on N devices: build the mesh,
AOT-lower and compile the real train step (the run's optimizer with its masks, its objective,
its batch and micro-batching, its shardings) on abstract arguments, so nothing is allocated,
and read the compiler's own memory analysis:

    params, optimizer state (moments; masks apart), gradients (the params' dtype) and, with
    gradient accumulation, their float32 running sum      per-device shard bytes
    temp       the step's temporaries (activations kept for the backward, gathered weights)
    peak       XLA's peak estimate of the program (arguments + outputs + temps - aliases)
    collectives  all-gather / reduce-scatter / all-reduce / ... ops in the compiled program

With a device memory budget it says whether the step fits and, when it does not, which of
`model.remat=full`, more gradient accumulation (smaller micro-batches) and fsdp over every
device makes it fit (each candidate is compiled and measured, not estimated).

Objectives whose inputs are other models (distillation, LoRA, soft prompts) are planned
without them only where that is exact; they are refused here for now (see the error).
"""

import re
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sparse_llama import objectives
from sparse_llama.commands import recipe_configs as stages
from sparse_llama.model import sharding
from sparse_llama.model.config import param_count
from sparse_llama.model.loss import BATCH_KEYS
from sparse_llama.optim import keep_sparse
from sparse_llama.train import config_checks, run_setup, sparse_start
from sparse_llama.train import state as state_lib
from sparse_llama.train.step import make_train_step

_DTYPES = {"inputs": jnp.int32, "targets": jnp.int32, "segment_ids": jnp.int32,
           "positions": jnp.int32, "loss_mask": jnp.float32}
_COLLECTIVE = re.compile(
    r"\b(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(")
GB = 10**9  # device memory budgets are given in GB (10^9 bytes), as vendors state them


def _shard_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.shape else ()
        total += int(np.prod(shape, dtype=np.int64)) * jnp.dtype(leaf.dtype).itemsize
    return total


def collectives(hlo_text: str) -> dict[str, int]:
    """How many of each collective op the compiled program holds."""
    counts: dict[str, int] = {}
    for match in _COLLECTIVE.finditer(hlo_text):
        counts[match.group(1)] = counts.get(match.group(1), 0) + 1
    return dict(sorted(counts.items()))


def plan_step(config: ml_collections.ConfigDict, devices: Sequence) -> dict:
    """The per-device memory plan of one training config's step on `devices`."""
    config_checks.check_train_config(config)
    if config.model.hf_path or not sparse_start.keeps_mask(config):
        # (a sparse stage of a recipe planned from nothing has no start yet: its state is
        # planned with the masks it will have)
        sparse_start.check_sparsity_config(config)
    name, lora = objectives.name_of(config), objectives.lora_rank(config)
    if not objectives.registered(config).plannable or lora:
        plannable = tuple(n for n, e in objectives.OBJECTIVES.items() if e.plannable)
        raise ValueError(f"launch.plan plans the {plannable} objectives without "
                         "LoRA; a run with other models as inputs (a teacher, a frozen base) "
                         f"is not planned yet (train.objective={name!r}, lora_rank={lora})")
    t = config.train
    mesh = sharding.make_mesh(config.mesh, devices)
    rules = sharding.rules_from_config(config.mesh)
    batch_sh = sharding.batch_sharding(mesh, rules)
    width = sharding.batch_width(mesh, rules)
    config_checks.check_batch_layout(t.batch_size, t.grad_accum, width, 1, t.data_shards)
    model = run_setup.planned_model(config)
    objective = objectives.build(config, model, mesh, rules)
    optimizer, schedule = run_setup.run_optimizer(config, objective)
    abstract = state_lib.abstract_state(model, optimizer, mesh, rules,
                                        param_dtype=jnp.dtype(config.model.param_dtype))
    shardings = jax.tree.map(lambda a: a.sharding, abstract)
    batch = {k: jax.ShapeDtypeStruct((t.batch_size, config.data.seq_len), _DTYPES[k],
                                     sharding=batch_sh) for k in BATCH_KEYS}
    masks = keep_sparse.find_masks(abstract.opt_state)
    params_b = _shard_bytes(abstract.params)
    masks_b = _shard_bytes(masks) if masks is not None else 0
    # train/step.py: the gradients have the params' dtype; with accumulation the micro-batch
    # gradients are also summed into a float32 copy, cast back once.
    grads_b = params_b
    accum_b = _shard_bytes(jax.tree.map(
        lambda p: jax.ShapeDtypeStruct(p.shape, jnp.float32, sharding=p.sharding),
        abstract.params)) if t.grad_accum > 1 else 0
    worst, seconds = None, 0.0
    # Phases (SAT's rungs) compile different programs: plan the first and the last update
    # (SAT's highest omission rate and its dense end); the larger one is the plan.
    for update in sorted({0, max(t.steps - 1, 0)}):
        step = make_train_step(model, optimizer, schedule, grad_accum=t.grad_accum,
                               state_shardings=shardings, batch_sharding=batch_sh,
                               objective=objective.for_step(update))
        t0 = time.time()
        compiled = step.lower(abstract, batch).compile()
        seconds += time.time() - t0
        stats = compiled.memory_analysis()
        # Every buffer live at once, outputs that reuse donated inputs counted once. (XLA:CPU
        # reports `peak_memory_in_bytes` as the arguments alone, so it is a lower bound.)
        peak = max(int(stats.peak_memory_in_bytes), int(
            stats.argument_size_in_bytes + stats.output_size_in_bytes
            + stats.temp_size_in_bytes - stats.alias_size_in_bytes))
        if worst is None or peak > worst[0]:
            worst = (peak, stats, compiled.as_text())
    peak, stats, text = worst
    return {
        "model": config.model.hf_path or config.model.preset, "params": param_count(model),
        "devices": len(devices), "mesh": dict(mesh.shape),
        "micro_batch": t.batch_size // t.grad_accum, "grad_accum": t.grad_accum,
        "seq_len": config.data.seq_len, "remat": model.remat, "sparse": masks is not None,
        "per_device": {
            "params_bytes": params_b,
            "optimizer_bytes": _shard_bytes(abstract.opt_state) - masks_b,
            "masks_bytes": masks_b,
            "gradients_bytes": grads_b,
            "grad_accumulator_bytes": accum_b,
            "argument_bytes": int(stats.argument_size_in_bytes),
            "temp_bytes": int(stats.temp_size_in_bytes),
            "output_bytes": int(stats.output_size_in_bytes),
            "alias_bytes": int(stats.alias_size_in_bytes),
        },
        "peak_bytes_per_device": peak,
        "collectives": collectives(text),
        "compile_seconds": round(seconds, 2),
    }


def _program_key(run: ml_collections.ConfigDict) -> str:
    """What decides a stage's compiled step: all but its optimizer rates and step count
    (which SAT's ladder does depend on)."""
    d = run.to_dict()
    d.pop("optimizer", None)
    if not objectives.registered(run).steps_shape_program:
        d["train"] = {k: v for k, v in d["train"].items() if k != "steps"}
    return repr(sorted(d.items()))


def _candidates(config: ml_collections.ConfigDict, num_devices: int):
    """(change, config) pairs to try, cheapest change first: full remat, then smaller
    micro-batches, then fsdp over every device."""
    def changed(**keys):
        c = ml_collections.ConfigDict(config.to_dict())
        for key, value in keys.items():
            section, name = key.split(".")
            c[section][name] = value
        return c

    t = config.train
    remat = {} if config.model.remat == "full" else {"model.remat": "full"}
    if remat:
        yield remat, changed(**remat)
    accum = t.grad_accum
    while (t.batch_size // (accum * 2)) >= 1 and t.batch_size % (accum * 2) == 0:
        accum *= 2
        keys = {**remat, "train.grad_accum": accum}
        yield keys, changed(**keys)
        if accum >= 4 * t.grad_accum:
            break
    if config.mesh.fsdp != num_devices:
        keys = {**remat, "mesh.data": 1, "mesh.fsdp": num_devices, "mesh.tensor": 1}
        yield keys, changed(**keys)


def plan(config: ml_collections.ConfigDict, devices: Sequence,
         device_memory_gb: float | None = None) -> dict:
    """`plan_step` of a run, or of every training stage of a recipe (the largest is the
    headline); with a budget, `fits` and, when it does not fit, the first measured change that
    does (`fits_with`) or null."""
    if device_memory_gb is not None and not device_memory_gb > 0:
        raise ValueError(f"--device_memory_gb must be > 0, got {device_memory_gb}")
    if "stages" in config:
        # Every training stage with a budget (a recipe's dense stage without one is the
        # pretrained start, model.hf_path, which need not exist to plan the others).
        runs = {name: stages.train_config(config, name, config.model.hf_path or "")
                for name in config.stages
                if config[name].kind == "train" and config[name].get("tokens", 0) > 0
                and not stages.skipped(config, name)}
        if not runs:
            raise ValueError("the recipe has no training stage with a token budget to plan")
    else:
        runs = {"run": config}
    plans, seen = {}, {}
    for name, run in runs.items():
        key = _program_key(run)
        if key not in seen:  # stages that differ only in budget and rates: one program
            seen[key] = plan_step(run, devices)
        plans[name] = seen[key]
    largest = max(plans, key=lambda n: plans[n]["peak_bytes_per_device"])
    out = {**plans[largest], "stage": largest if "stages" in config else None}
    if len(plans) > 1:
        out["stages"] = {n: p["peak_bytes_per_device"] for n, p in plans.items()}
    if device_memory_gb is not None:
        budget = device_memory_gb * GB
        out["device_memory_bytes"] = int(budget)
        out["fits"] = out["peak_bytes_per_device"] <= budget
        if not out["fits"]:
            out["fits_with"] = None
            for change, candidate in _candidates(runs[largest], len(devices)):
                try:
                    tried = plan_step(candidate, devices)
                except ValueError:  # e.g. a micro-batch that no longer splits over the mesh
                    continue
                if tried["peak_bytes_per_device"] <= budget:
                    out["fits_with"] = {"change": change,
                                        "peak_bytes_per_device": tried["peak_bytes_per_device"]}
                    break
    return out


def format_plan(p: dict) -> str:
    """A human-readable table of a plan (GiB per device)."""
    gib = 2**30
    lines = [f"{p['model']} ({p['params'] / 1e9:.2f}B params) on {p['devices']} devices, mesh "
             f"{p['mesh']}, micro-batch {p['micro_batch']} x {p['seq_len']} (x{p['grad_accum']}"
             f" accumulated), remat {p['remat']}" + (f", stage {p['stage']}" if p.get("stage")
                                                     else "")]
    for key, value in p["per_device"].items():
        lines.append(f"  {key.removesuffix('_bytes'):>10}: {value / gib:9.3f} GiB")
    lines.append(f"  {'peak':>10}: {p['peak_bytes_per_device'] / gib:9.3f} GiB")
    lines.append(f"  collectives: {p['collectives']}")
    if "fits" in p:
        verdict = "fits" if p["fits"] else "does NOT fit"
        lines.append(f"  {verdict} in {p['device_memory_bytes'] / GB:g} GB")
        if not p["fits"]:
            lines.append(f"  fits with: {p['fits_with']}")
    return "\n".join(lines)
