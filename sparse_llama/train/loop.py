"""`train(config, workdir)`: dense or sparse training of any objective, with evaluation,
checkpoints and export.

The order of work: validate the config; build the mesh, the tokenizer, the model config, the
objective (`train.objective`, train/objective.py) and the optimizer (AdamW, wrapped in
keep-sparse when `sparsity.keep`); open `<workdir>/checkpoints` and either restore the newest
checkpoint (state and data order) or create the state (a preset initialised in place, or a
Hugging Face directory's weights, with the masks sparse_start.py picks); then step, evaluate,
checkpoint; finally export `<workdir>/hf` (with `masks/` and `sparsity_report.json` when the
run keeps a mask).

Host and device overlap: a step's metrics are read one step late, so the host prepares the
next batch while the device runs; at every checkpoint, evaluation or stop the current step's
metrics are read first, so a checkpoint is never written from a diverged state.
"""

import json
import math
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from sparse_llama.data import pipeline
from sparse_llama.model import sharding
from sparse_llama.model.loss import BATCH_KEYS
from sparse_llama.optim import keep_sparse
from sparse_llama.train import config_checks, export, run_setup, sparse_start
from sparse_llama.train import state as state_lib
from sparse_llama.train.checkpoint import Checkpoints, StopRequest
from sparse_llama.train.metrics import RunMetrics, startup_summary
from sparse_llama.train.objective import Objective
from sparse_llama.train.step import make_eval_step, make_train_step

# (config, model, mesh, rules) -> the run's Objective
Builder = Callable[..., Objective]


class TrainingDivergedError(ValueError):
    """The loss, gradient or params became NaN/inf; nothing of that step was saved."""


class ProcessBatches:
    """This process's rows of every global batch, read from its share of the data shards.

    Shard j of S yields rows [j * B / S, (j + 1) * B / S) of each global batch of B rows;
    process p of P reads shards p * S / P .. (p + 1) * S / P - 1 and concatenates them, which
    are exactly the rows its devices hold. The state is the list of the shards' states.
    """

    def __init__(self, data_cfg, tokenizer, *, seq_len: int, batch_size: int, seed: int,
                 shards: int, tokenizer_dir: str | None = None):
        per_process = shards // jax.process_count()
        first = jax.process_index() * per_process
        self._iterators = [
            pipeline.train_iterator(data_cfg, tokenizer, seq_len=seq_len,
                                    global_batch_size=batch_size, seed=seed,
                                    process_index=j, process_count=shards,
                                    tokenizer_dir=tokenizer_dir)  # its chat template
            for j in range(first, first + per_process)]

    def __iter__(self) -> "ProcessBatches":
        return self

    def __next__(self) -> dict:
        parts = [next(it) for it in self._iterators]
        if len(parts) == 1:
            return parts[0]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def get_state(self) -> list:
        return [it.get_state() for it in self._iterators]

    def set_state(self, states: list) -> None:
        if not isinstance(states, list) or len(states) != len(self._iterators):
            raise ValueError(f"the checkpoint's data state has {len(states)} shard(s) for this "
                             f"process but this run reads {len(self._iterators)}; resume with "
                             "the same train.data_shards and process count")
        for it, state in zip(self._iterators, states, strict=True):
            it.set_state(state)


def _batch_devices(batch_sh) -> int:
    spec = batch_sh.spec[0]
    axes = () if spec is None else ((spec,) if isinstance(spec, str) else spec)
    return math.prod(batch_sh.mesh.shape[a] for a in axes)


def _place(batch: dict, batch_sh, global_rows: int) -> dict:
    """Numpy rows of this process -> global arrays sharded over the batch axes."""
    return {k: jax.make_array_from_process_local_data(
        batch_sh, np.asarray(v), (global_rows, *np.shape(v)[1:])) for k, v in batch.items()}


def _pad_rows(batch: dict, rows: int) -> dict:
    """Pad a short (last) evaluation batch with rows that count for nothing (mask 0)."""
    n = np.shape(batch["inputs"])[0]
    if n == rows:
        return batch
    return {k: np.concatenate([np.asarray(v), np.zeros((rows - n, *np.shape(v)[1:]),
                                                       np.asarray(v).dtype)]) for k, v in
            batch.items()}


def evaluate(eval_step, params, batches: list[dict], batch_sh, rows: int, *inputs) -> dict:
    """Perplexity over the evaluation batches (every process holds all of them); `inputs`:
    the frozen arrays of an objective that trains adapters."""
    nll, tokens = 0.0, 0.0
    for batch in batches:
        full = _pad_rows({k: batch[k] for k in BATCH_KEYS}, rows)
        out = jax.device_get(eval_step(params, _place(full, batch_sh, rows), *inputs))
        nll += float(out["nll_sum"])
        tokens += float(out["tokens"])
    loss = nll / max(tokens, 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": tokens}


def _run_config_json(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json_best_effort())


def _check_finite(step: int, m: dict, checkpoints: Checkpoints) -> None:
    bad = {k: float(m[k]) for k in ("loss", "grad_norm", "param_norm")
           if not math.isfinite(float(m[k]))}
    if not bad:
        return
    checkpoints.wait()
    last = checkpoints.latest_step()
    kept = (f"the last good checkpoint is step {last} in {checkpoints.directory}"
            if last is not None else "no checkpoint was saved")
    raise TrainingDivergedError(
        f"training diverged at step {step}: {bad} became non-finite; stopped without saving "
        f"that step ({kept}); lower optimizer.lr, raise optimizer.warmup_steps or set "
        "optimizer.clip_norm, then rerun (it resumes from the last good checkpoint)")


def train(config: ml_collections.ConfigDict, workdir: str, *, build_objective: Builder,
          stop: StopRequest | None = None) -> dict:
    """Train to `config.train.steps` (resuming from `workdir`); returns the run summary.

    `build_objective(config, model, mesh, rules)` gives the run's Objective (the commands
    pass the registry's, sparse_llama/objectives.py).

    Summary: step, loss (mean train loss of the last log interval), eval_perplexity,
    tokens_per_s (batch tokens per second, compile excluded), workdir, stopped (True when a
    SIGTERM or `stop.request()` ended the run early, after a checkpoint).
    """
    config_checks.check_train_config(config)
    sparse_start.check_sparsity_config(config)
    t = config.train
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.rules_from_config(config.mesh)
    tokenizer, tokenizer_dir = run_setup.resolve_tokenizer(config)
    model = run_setup.resolve_model_config(config, tokenizer)
    batch_sh = sharding.batch_sharding(mesh, rules)
    config_checks.check_batch_layout(t.batch_size, t.grad_accum, _batch_devices(batch_sh),
                                     jax.process_count(), t.data_shards)
    objective = build_objective(config, model, mesh, rules)
    optimizer, schedule = run_setup.run_optimizer(config, objective)
    trainable = objective.trainable
    keep = sparse_start.keeps_mask(config) and trainable is None
    param_dtype = jnp.dtype(config.model.param_dtype)
    if trainable is None:
        abstract = state_lib.abstract_state(model, optimizer, mesh, rules,
                                            param_dtype=param_dtype)
    else:
        abstract = state_lib.abstract_trainable_state(trainable.init, optimizer, mesh)
    shardings = jax.tree.map(lambda a: a.sharding, abstract)

    checkpoints = Checkpoints(workdir, keep=t.keep_checkpoints)
    seq_len = config.data.seq_len
    data_iter = ProcessBatches(config.data, tokenizer, seq_len=seq_len,
                               batch_size=t.batch_size, seed=t.seed,
                               shards=t.data_shards or jax.process_count(),
                               tokenizer_dir=tokenizer_dir)
    restored = checkpoints.restore_latest(abstract, model=model)  # skips damaged steps
    if restored is not None:
        state, data_state = restored
        data_iter.set_state(data_state)
    else:
        state = run_setup.initial_state(config, model, optimizer, mesh, rules, param_dtype,
                                          trainable)
    tokenizer_dir = export.save_tokenizer(tokenizer, tokenizer_dir, workdir)

    micro_rows = t.batch_size // t.grad_accum
    eval_data = (pipeline.eval_batches(config.data, tokenizer, seq_len=seq_len,
                                       batch_size=micro_rows, max_batches=t.eval_batches,
                                       tokenizer_dir=tokenizer_dir)
                 if t.eval_batches else [])
    compiled: dict = {}  # phase -> jitted step (one program per phase of the objective)

    def step_for(update: int):
        phase = objective.phase(update)
        if phase not in compiled:
            if compiled:
                logging.warning("step %d enters objective phase %r: compiling its step",
                                update, phase)
            compiled[phase] = make_train_step(
                model, optimizer, schedule, grad_accum=t.grad_accum, state_shardings=shardings,
                batch_sharding=batch_sh, objective=objective.for_step(update))
        return compiled[phase]

    step_inputs = () if objective.inputs is None else (objective.inputs,)
    eval_step = make_eval_step(
        model, param_shardings=shardings.params, batch_sharding=batch_sh,
        loss=None if trainable is None else trainable.eval_loss,
        input_shardings=objective.input_shardings if trainable is not None else None)
    eval_inputs = step_inputs if trainable is not None else ()

    step = int(jax.device_get(state.step))
    tokens_per_step = t.batch_size * seq_len
    source = config.model.hf_path or f"preset {config.model.preset}"
    if jax.process_index() == 0:
        print(startup_summary(model, mesh=mesh, data_cfg=config.data, train_cfg=t,
                              start_step=step, tokens_per_step=tokens_per_step, source=source),
              flush=True)
    run_config = _run_config_json(config)
    log = RunMetrics(workdir, total_steps=t.steps, start_step=step,
                     tokens_per_step=tokens_per_step)
    window: list[dict] = []  # checked metrics since the last log record
    last_loss, eval_ppl, stopped = float("nan"), float("nan"), False
    pending = None  # (step, device metrics) dispatched but not yet checked

    def settle():
        """Read and check the pending step's metrics (blocks until that step is done)."""
        nonlocal pending
        if pending is not None:
            s, m = pending
            pending = None
            m = {k: float(v) for k, v in jax.device_get(m).items()}
            _check_finite(s, m, checkpoints)
            window.append(m)
            if s == first_step + 1:
                log.start_timing(s)

    def save():
        log.pause()
        checkpoints.save(state, data_iter.get_state(), model=model, run_config=run_config)
        log.resume()

    first_step = step
    stop_request = stop or StopRequest()
    try:
        with stop_request:
            while step < t.steps:
                batch = next(data_iter)
                state, metrics = step_for(step)(state, _place(batch, batch_sh, t.batch_size),
                                                *step_inputs)
                settle()  # the previous step; this one runs meanwhile
                step += 1
                pending = (step, metrics)
                stopped = stop_request.should_stop(step) and step < t.steps
                done = step == t.steps or stopped
                if step == first_step + 1 or step % t.log_every == 0 or done:
                    settle()
                    if window:
                        mean_loss = float(np.mean([w["loss"] for w in window]))
                        last_loss = mean_loss
                        log.train(step, {**window[-1], "loss": mean_loss})
                        window.clear()
                if (t.checkpoint_every and step % t.checkpoint_every == 0) or done:
                    settle()
                    save()
                # A stop (preemption) only checkpoints: the grace period is short.
                if eval_data and ((t.eval_every and step % t.eval_every == 0)
                                  or step == t.steps):
                    settle()
                    log.pause()
                    result = evaluate(eval_step, state.params, eval_data, batch_sh, micro_rows,
                                      *eval_inputs)
                    eval_ppl = result["perplexity"]
                    log.eval(step, result)
                    log.resume()
                if stopped:
                    logging.info("stop requested: checkpointed step %d, exiting", step)
                    break
            settle()
            if step >= t.steps and eval_data and math.isnan(eval_ppl):
                result = evaluate(eval_step, state.params, eval_data, batch_sh, micro_rows,
                                      *eval_inputs)
                eval_ppl = result["perplexity"]
                log.eval(step, result)
        checkpoints.wait()
        hf_dir = report = None
        written: dict = {}
        if t.export_hf and not stopped and trainable is not None:
            # The adapters are small and replicated: one host copy of them.
            written = trainable.export(jax.tree.map(sharding.host_array, state.params),
                                       objective.inputs, workdir, tokenizer_dir)
            hf_dir, report = written.pop("hf_dir", None), written.pop("sparsity_report", None)
        elif t.export_hf and not stopped:
            masks = keep_sparse.find_masks(state.opt_state) if keep else None
            hf_dir, report = export.export_run(state.params, masks, model,
                                               os.path.join(workdir, "hf"),
                                               tokenizer_dir=tokenizer_dir)
    finally:
        log.close()
        checkpoints.close()
    summary = {"step": step, "loss": last_loss, "eval_perplexity": eval_ppl,
               "tokens_per_s": log.tokens_per_s(), "workdir": os.path.abspath(workdir)}
    # No value is a NaN: what a run did not measure is null in the JSON line.
    summary = {k: (None if isinstance(v, float) and math.isnan(v) else v)
               for k, v in summary.items()}
    if stopped:
        summary["stopped"] = True
    summary.update(written)
    if hf_dir:
        summary["hf_dir"] = hf_dir
        if report is not None:
            summary["sparsity"] = report["overall"]
    return summary
