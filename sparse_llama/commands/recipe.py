"""Staged recipes: named stages run in order, each from the model the previous one produced.

A recipe config (configs/sparse70.py, sparse50.py, spdf.py) has `stages`, a tuple of names, and
one section per name whose `kind` is a key of `STAGE_KINDS`:

    train   `commands.train` for `tokens` tokens (steps = tokens / (batch_size * seq_len)), dense or
            with the mask kept (`sparse`), from the previous model (or from scratch when first
            and no `model.hf_path` is given; a first dense stage is skipped when it is given)
    prune   `commands.prune` (SparseGPT / Wanda / magnitude, uniform or OWL) with calibration
            windows drawn from the training mixture; `keep_zeros` extends the previous mask
    eval    perplexity of the current model on the eval text, written to `<stage>/eval.json`
    export  the current model (with masks) written once more, in `dtype`, to `<stage>/hf`
    soft_prompt  a soft prompt for the current (frozen) model trained for `tokens` tokens
            (configs/soft_prompt.py's objective) on `data_path` or the recipe's data, written
            to `<stage>/soft_prompt.safetensors` and measured with it; the model is unchanged

Each stage works in `<workdir>/<stage>/` and ends by writing `<stage>/stage.json` (its record);
a stage with that file is done and is never redone, so rerunning the command resumes: a killed
training stage continues from its own last checkpoint, a killed prune restarts (its output
appears whole or not at all). Every stage's record holds `sparsity` (exact zeros of the target
tensors, counted from the weights) and `perplexity`: what `launch.eval` reports on the eval text
(`data.eval_path`, or the held-out documents of the training mixture written once to
`<workdir>/eval_text.txt`, so the numbers compare across stages and with other tools).

`check_recipe` builds and checks every stage's config before the first stage runs, against the
start's config.json (or preset) and each prune stage's own output directory; a first sparse
stage on `model.hf_path` needs a sparse start (`checkpoint_sparsity`: its masks file or its
exact zeros, read on the host tensor by tensor).
"""

import json
import math
import os
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
from absl import logging
from safetensors import safe_open

from sparse_llama import loading
from sparse_llama.adapters import objective as adapters
from sparse_llama.commands import eval as eval_run
from sparse_llama.commands import prune as prune_run
from sparse_llama.commands import recipe_plots as plots
from sparse_llama.commands import train as train_command
from sparse_llama.data import corpus, pipeline, sources
from sparse_llama.data.tokenizer import load_tokenizer
from sparse_llama.ground import publish
from sparse_llama.model import hf_io, soft_prompt
from sparse_llama.model.config import LlamaConfig, check_context
from sparse_llama.sparse_io import mask_io
from sparse_llama.sparse_io.report import format_report, sparsity_report
from sparse_llama.sparse_io.sparse_export import save_sparse_hf
from sparse_llama.sparsity import masks as masks_lib
from sparse_llama.train import config_checks, run_setup, sparse_start

RECORD = "stage.json"
# No tokenizer averages this many bytes per token: a text of at least this many bytes per
# window token has a window, and only a shorter one is tokenized up front (check_recipe).
_BYTES_PER_TOKEN_BOUND = 64


def _model_section(config: ml_collections.ConfigDict, hf_path: str) -> ml_collections.ConfigDict:
    model = ml_collections.ConfigDict(config.model.to_dict())
    model.hf_path = hf_path
    return model


def train_config(config: ml_collections.ConfigDict, name: str, hf_path: str
                 ) -> ml_collections.ConfigDict:
    """The `commands.train` config of train stage `name` starting from `hf_path` ("" = scratch)."""
    stage = config[name]
    run = ml_collections.ConfigDict()
    run.model = _model_section(config, hf_path)
    run.mesh = config.mesh
    run.data = ml_collections.ConfigDict(config.data.to_dict())
    if stage.get("data_path"):
        run.data.path = stage.data_path
    run.train = ml_collections.ConfigDict(stage.train.to_dict())
    tokens_per_step = run.train.batch_size * run.data.seq_len
    run.train.steps = max(1, round(stage.tokens / tokens_per_step))
    run.optimizer = stage.optimizer
    run.sparsity = ml_collections.ConfigDict({
        "keep": bool(stage.sparse), "masks_path": "", "init": stage.get("mask_init", ""),
        "sparsity": float(stage.get("mask_sparsity", 0.0)),
        "release": bool(stage.get("release", False))})
    return run


def prune_config(config: ml_collections.ConfigDict, name: str, hf_path: str,
                 windows_path: str, output_dir: str) -> ml_collections.ConfigDict:
    """The `commands.prune` config of prune stage `name` (the stage carries complete
    `pruning` and `calibration` sections, configs/blocks.py `prune_stage`)."""
    stage = config[name]
    run = ml_collections.ConfigDict()
    run.model = _model_section(config, hf_path)
    run.mesh = config.mesh
    run.pruning = ml_collections.ConfigDict(stage.pruning.to_dict())
    run.calibration = ml_collections.ConfigDict(stage.calibration.to_dict())
    run.calibration.path = windows_path
    # The recipe measures every stage itself (`eval` stages, the stage records): no
    # perplexity inside the prune run.
    run.eval = ml_collections.ConfigDict({"path": "", "seq_len": config.eval.seq_len,
                                          "batch_size": config.eval.batch_size})
    run.output_dir = output_dir
    run.save_dtype = ""  # the loaded dtype
    return run


def _prune_target(run: ml_collections.ConfigDict) -> float:
    """The sparsity a prune stage's config asks for (N/M for an N:M pattern)."""
    return run.pruning.n / run.pruning.m if run.pruning.n else run.pruning.sparsity


def _first_model_stage(config, *, run_only: bool = False) -> str | None:
    """The first train or prune stage (`run_only`: the first one that is not skipped)."""
    for name in config.stages:
        if config[name].kind in ("train", "prune") and not (run_only and skipped(config, name)):
            return name
    return None


def skipped(config, name: str) -> bool:
    """A leading dense pretraining stage is skipped when the run starts from a checkpoint."""
    stage = config[name]
    return (bool(config.model.hf_path) and stage.kind == "train" and not stage.sparse
            and name == _first_model_stage(config) and not stage.get("mask_init", ""))


def checkpoint_sparsity(hf_dir: str) -> tuple[float, str]:
    """(fraction of the target weights pruned, what it was read from) of a checkpoint
    directory: its masks file (`masks/`, one bit per weight) when it has one, else its exact
    zeros; read on the host one tensor at a time (nothing on a device, never the model)."""
    index = hf_io.open_checkpoint(hf_dir)  # the headers: names, shapes, files
    targets = {n: t for n, t in index.tensors.items() if masks_lib.is_target("/".join(t.path))}
    masks_dir = Path(hf_dir) / "masks"
    mask_files = sorted(masks_dir.glob(f"{mask_io.PREFIX}*.safetensors"))
    files = mask_files or sorted(set(index.files[n] for n in targets))
    pruned = 0
    for file in files:
        with safe_open(str(file), framework="numpy") as f:
            for name in (n for n in f.keys() if n in targets):
                if mask_files:  # packed along the last axis (sparse_io/mask_io.py)
                    kept = np.unpackbits(f.get_tensor(name), axis=-1,
                                         count=targets[name].hf_shape[-1])
                    pruned += kept.size - int(np.count_nonzero(kept))
                else:
                    pruned += int(np.count_nonzero(f.get_tensor(name) == 0))
    total = sum(math.prod(t.hf_shape) for t in targets.values())
    return pruned / max(total, 1), (f"its masks file ({masks_dir})" if mask_files
                                    else "its exact zeros")


def model_sparsity(hf_dir: str) -> float:
    """The sparsity of the model in `hf_dir` from the `sparsity_report.json` beside it (every
    prune output and sparse export has one), else `checkpoint_sparsity`."""
    report = os.path.join(hf_dir, "sparsity_report.json")
    if os.path.isfile(report):
        with open(report) as f:
            return float(json.load(f)["overall"])
    return checkpoint_sparsity(hf_dir)[0]


def _check_sparse_start(config, name: str) -> None:
    """A first training stage that keeps the start's mask needs a sparse start."""
    sparsity, source = checkpoint_sparsity(config.model.hf_path)
    if sparsity < sparse_start.DENSIFY_WARNING_SPARSITY:
        raise ValueError(
            f"stage {name!r} trains sparse, keeping the mask of model.hf_path="
            f"{config.model.hf_path!r}, which is {sparsity:.3f} sparse (measured from "
            f"{source}), not a sparse model (under "
            f"{sparse_start.DENSIFY_WARNING_SPARSITY:.0%} pruned); put a prune stage first, set config.{name}."
            f"mask_init, or start from a pruned model (a launch.prune output)")


def _check_eval_text(config) -> None:
    """Every stage is measured on the eval text: it must hold one window of eval.seq_len
    tokens. Only a text too short for the byte bound is tokenized (the run's tokenizer)."""
    seq_len, path = config.eval.seq_len, config.data.eval_path
    if path:
        if os.path.getsize(path) >= _BYTES_PER_TOKEN_BOUND * seq_len:
            return
        text = _read_eval_path(config, path)
    else:
        text = _held_out_text(config)
        if len(text.encode()) >= _BYTES_PER_TOKEN_BOUND * seq_len:
            return
    tokens = len(run_setup.resolve_tokenizer(config)[0].encode(text))
    if tokens < seq_len:
        where = (f"data.eval_path={path!r}" if path else "the held-out text, eval.max_chars="
                 f"{config.eval.max_chars}")
        raise ValueError(f"the evaluation text ({where}) has {tokens} tokens, fewer than one "
                         f"window of eval.seq_len={seq_len}; use a longer text or lower "
                         "--config.eval.seq_len")


def _check_export_dtype(name: str, dtype: str) -> None:
    if dtype:
        try:
            hf_io.check_save_dtype(dtype)
        except ValueError as err:
            raise ValueError(f"config.{name}.{err} ('' keeps the model's)") from None


def check_recipe(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Every stage's settings, before anything is loaded or written (ValueError naming the
    key and the fix): each stage's config is built and checked as the stage will check it,
    against the model's config.json (or preset), and each prune stage's output against its
    own directory under `workdir`."""
    stages = tuple(config.get("stages") or ())
    if not stages:
        raise ValueError("the recipe has no stages; set config.stages to a tuple of section "
                         "names (configs/sparse70.py shows one)")
    if len(set(stages)) != len(stages):
        raise ValueError(f"config.stages={stages} names a stage twice; give each its own name")
    loading.check_model_section(config.model)
    if not config.data.eval_path and any(
            spec.kind not in pipeline.DEFAULT_KINDS for spec in pipeline.mixture(config.data)):
        raise ValueError("the recipe measures every stage on an evaluation text: set "
                         "--config.data.eval_path=FILE (held-out text of your data)")
    if config.data.eval_path and not os.path.isfile(config.data.eval_path):
        raise FileNotFoundError(f"data.eval_path={config.data.eval_path!r} is not a file")
    for name in stages:
        if name not in config or not isinstance(config[name], ml_collections.ConfigDict):
            raise ValueError(f"stage {name!r} of config.stages has no config.{name} section")
        kind = config[name].get("kind")
        if kind not in STAGE_KINDS:
            raise ValueError(f"config.{name}.kind={kind!r} is not a stage kind; use one of "
                             f"{sorted(STAGE_KINDS)}")
    # Every stage's model has the start's architecture: config.json of model.hf_path, or
    # the preset.
    model = loading.model_config(config.model)
    check_context(config.eval.seq_len, model, "eval.seq_len")
    last_sparsity, has_model = 0.0, bool(config.model.hf_path)
    for name in stages:
        if skipped(config, name):
            continue
        stage, kind = config[name], config[name].kind
        if kind in ("train", "soft_prompt"):
            has_model, last_sparsity = _check_train_stage(config, name, model, has_model,
                                                          last_sparsity)
        elif kind == "prune":
            if not has_model:
                raise ValueError(f"prune stage {name!r} has no model to prune; give "
                                 "model.hf_path or put a train stage before it")
            run = prune_config(config, name, "", "", os.path.join(workdir, name, "hf"))
            prune_run.check_against_model(model, prune_run.check_prune_config(run))
            target = _prune_target(run)
            if target < last_sparsity - 1e-9:
                raise ValueError(f"prune stage {name!r} asks for sparsity {target:g}, below the "
                                 f"{last_sparsity:g} an earlier stage reached; a mask is only "
                                 f"ever extended (raise config.{name}.pruning.sparsity)")
            last_sparsity = target
        elif not has_model:
            raise ValueError(f"{kind} stage {name!r} comes before any model exists; give "
                             "model.hf_path or put a train stage first")
        elif kind == "export":
            _check_export_dtype(name, stage.get("dtype", ""))
    first = _first_model_stage(config, run_only=True)
    if (config.model.hf_path and first and config[first].kind == "train"
            and config[first].sparse and not config[first].get("mask_init", "")):
        _check_sparse_start(config, first)
    _check_eval_text(config)


def _check_train_stage(config, name: str, model: LlamaConfig, has_model: bool,
                       last_sparsity: float) -> tuple[bool, float]:
    """A train or soft_prompt stage's checks; (a model exists after it, the sparsity
    reached)."""
    stage = config[name]
    tokens = stage.get("tokens")
    if not isinstance(tokens, (int, float)) or tokens <= 0:
        raise ValueError(f"config.{name}.tokens={tokens!r} must be a positive token "
                         "budget" + ("" if has_model else "; or start from a trained "
                                     "model with --config.model.hf_path=DIR"))
    run = train_config(config, name, "")  # the stage's start does not exist yet
    config_checks.check_train_config(run)
    check_context(run.data.seq_len, model)
    if stage.kind == "soft_prompt":
        if not has_model:
            raise ValueError(f"soft_prompt stage {name!r} has no model to prompt; give "
                             "model.hf_path or put a train stage before it")
        adapters.check_soft_prompt_config(soft_prompt_config(config, name, ""), model)
        return has_model, last_sparsity
    if stage.sparse and not has_model and not stage.get("mask_init", ""):
        raise ValueError(f"stage {name!r} trains sparse but no earlier stage made a "
                         "sparse model; put a prune stage first, set config."
                         f"{name}.mask_init, or give model.hf_path")
    if run.sparsity.init:
        sparse_start.check_sparsity_config(run)
        last_sparsity = max(last_sparsity, run.sparsity.sparsity)
    return True, last_sparsity


def _held_out_text(config: ml_collections.ConfigDict) -> str:
    """The embedded corpus's held-out documents joined by blank lines (at most
    `eval.max_chars` characters)."""
    parts = []
    for spec in pipeline.mixture(config.data):
        held = corpus.split(pipeline.DEFAULT_KINDS[spec.kind])[1]
        parts.extend(held[i] for i in range(len(held)))
    text = "\n\n".join(parts)
    return text[:config.eval.max_chars] if config.eval.max_chars else text


def _read_eval_path(config: ml_collections.ConfigDict, path: str) -> str:
    """A text file as it is; documents (.jsonl, .parquet) joined by blank lines."""
    kind = sources.infer_kind(path)
    if kind != "text":
        docs = sources.read_documents(kind, path, text_field=config.data.text_field)
        return "\n\n".join(docs[i] for i in range(len(docs)))
    with open(path, encoding="utf-8") as f:
        return f.read()


def eval_text(config: ml_collections.ConfigDict, workdir: str) -> str:
    """The evaluation text: `data.eval_path` read as launch.eval reads it; for the embedded
    corpus, its held-out text, written once to `<workdir>/eval_text.txt`."""
    if config.data.eval_path:
        return _read_eval_path(config, config.data.eval_path)
    path = os.path.join(workdir, "eval_text.txt")
    if not os.path.isfile(path):
        publish.write_text(path, _held_out_text(config))
    return _read_eval_path(config, path)


def measure(config: ml_collections.ConfigDict, hf_dir: str, text: str, label: str,
            prompt_path: str = "") -> dict:
    """{"sparsity", "perplexity"} of the model in `hf_dir` (weights counted, launch.eval's
    perplexity protocol; with the soft prompt of `prompt_path` before every window when
    given), logging its sparsity report."""
    bundle = loading.load_model(_model_section(config, hf_dir))
    prompt = soft_prompt.load(prompt_path, bundle.config) if prompt_path else None
    report = sparsity_report(bundle.params)
    print(f"[{label}] sparsity {report['overall']:.4f}\n{format_report(report)}", flush=True)
    tokenizer = load_tokenizer(hf_dir)
    result = eval_run.evaluate_text(bundle, tokenizer, text, config.eval.seq_len,
                                    batch_size=config.eval.batch_size, mesh_cfg=config.mesh,
                                    desc=f"eval ({label})", prompt=prompt)
    if not math.isfinite(result.perplexity):
        raise ValueError(f"stage {label}: perplexity is {result.perplexity} (the model's loss "
                         "is not finite); lower that stage's learning rate")
    print(f"[{label}] perplexity {result.perplexity:.4f} over {result.tokens} tokens", flush=True)
    return {"sparsity": report["overall"], "perplexity": result.perplexity}


def _train_stage(config, name, hf_path, stage_dir, text):
    run = train_config(config, name, hf_path)
    summary = train_command.train(run, stage_dir)
    if summary.get("stopped"):
        return None  # preempted: checkpointed; the rerun resumes inside this stage
    tokens = run.train.steps * run.train.batch_size * run.data.seq_len
    return {"hf_dir": summary["hf_dir"], "tokens": tokens, "steps": run.train.steps}


def soft_prompt_config(config: ml_collections.ConfigDict, name: str, hf_path: str
                       ) -> ml_collections.ConfigDict:
    """The `commands.train` config of soft-prompt stage `name` for the model in `hf_path`."""
    run = train_config(config, name, hf_path)
    run.train.objective = "soft_prompt"
    run.soft_prompt = config[name].soft_prompt
    return run


def _soft_prompt_stage(config, name, hf_path, stage_dir, text):
    run = soft_prompt_config(config, name, hf_path)
    summary = train_command.train(run, stage_dir)
    if summary.get("stopped"):
        return None
    tokens = run.train.steps * run.train.batch_size * run.data.seq_len
    measured = measure(config, hf_path, text or eval_text(config, os.path.dirname(stage_dir)),
                       name, prompt_path=summary["soft_prompt"])
    return {"hf_dir": hf_path, "soft_prompt": summary["soft_prompt"], "tokens": tokens,
            "steps": run.train.steps, "measured": measured}


def calibration_windows(config, name: str, hf_path: str, path: str) -> None:
    """`num_samples` windows of `seq_len` tokens from the training mixture (seeded), as .npy."""
    cal = config[name].calibration
    tokenizer = load_tokenizer(hf_path)
    batches = pipeline.train_iterator(config.data, tokenizer, seq_len=cal.seq_len,
                                      global_batch_size=cal.num_samples, seed=cal.seed,
                                      process_index=0, process_count=1)
    rows = []
    # Full windows only: a source's last window may be padded, and padding is no text.
    for _ in range(16):
        batch = next(batches)
        full = np.asarray(batch["loss_mask"]).min(axis=1) > 0
        rows.extend(np.asarray(batch["inputs"], np.int32)[full])
        if len(rows) >= cal.num_samples:
            break
    if len(rows) < cal.num_samples:
        raise ValueError(f"stage {name!r}: the training data gave only {len(rows)} full windows "
                         f"of {cal.seq_len} tokens for {cal.num_samples} calibration samples; "
                         f"lower config.{name}.calibration.num_samples or seq_len")
    windows = np.stack(rows[:cal.num_samples])
    publish.write_file(path, lambda tmp: np.save(tmp, windows))


def _prune_stage(config, name, hf_path, stage_dir, text):
    run = prune_config(config, name, hf_path, "", os.path.join(stage_dir, "hf"))
    start_sparsity = model_sparsity(hf_path)  # its report, else counted tensor by tensor
    target = _prune_target(run)
    if target < start_sparsity - 1e-6:
        raise ValueError(f"prune stage {name!r}: the model is already {start_sparsity:.3f} "
                         f"sparse, more than the {target:g} asked; raise config.{name}."
                         "pruning.sparsity")
    windows = os.path.join(stage_dir, "calibration.npy")
    if jax.process_index() == 0:
        calibration_windows(config, name, hf_path, windows)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"sparse_llama_calibration_{name}")
    run.calibration.path = windows
    summary = prune_run.run(run)
    cal = config[name].calibration
    return {"hf_dir": summary["output_dir"], "tokens": cal.num_samples * cal.seq_len}


def _eval_stage(config, name, hf_path, stage_dir, text):
    result = measure(config, hf_path, text, name)
    publish.write_text(os.path.join(stage_dir, "eval.json"),
                  json.dumps({"hf_dir": hf_path, "seq_len": config.eval.seq_len, **result}))
    return {"hf_dir": hf_path, "tokens": 0, "measured": result}


def _export_stage(config, name, hf_path, stage_dir, text):
    bundle = loading.load_model(_model_section(config, hf_path))
    masks_dir = os.path.join(hf_path, "masks")
    masks = (mask_io.load_masks(masks_dir, bundle.params) if os.path.isdir(masks_dir)
             else masks_lib.masks_from_zeros(bundle.params))
    out, _ = save_sparse_hf(bundle.params, bundle.config, os.path.join(stage_dir, "hf"),
                            masks=jax.tree.map(np.asarray, masks), tokenizer_dir=hf_path,
                            dtype=config[name].get("dtype") or None)
    return {"hf_dir": str(out), "tokens": 0}


STAGE_KINDS = {"train": _train_stage, "prune": _prune_stage, "eval": _eval_stage,
               "export": _export_stage, "soft_prompt": _soft_prompt_stage}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Run (or resume) every stage; returns {"stages": [...], "hf_dir", "workdir"}."""
    check_recipe(config, workdir)
    os.makedirs(workdir, exist_ok=True)
    current = config.model.hf_path or ""
    records = []
    text = None
    if current:
        text = eval_text(config, workdir)
        start = os.path.join(workdir, "start.json")
        if os.path.isfile(start):
            with open(start) as f:
                record = json.load(f)
        else:
            t0 = time.time()
            record = {"name": "start", **measure(config, current, text, "start"), "tokens": 0}
            record["seconds"] = round(time.time() - t0, 3)
            publish.write_text(start, json.dumps(record))
        records.append(record)
    for name in config.stages:
        if skipped(config, name):
            logging.warning("stage %s skipped: the run starts from model.hf_path", name)
            continue
        stage_dir = os.path.join(workdir, name)
        record_path = os.path.join(stage_dir, RECORD)
        if os.path.isfile(record_path):
            with open(record_path) as f:
                record = json.load(f)
            print(f"[{name}] done earlier: {record}", flush=True)
        else:
            os.makedirs(stage_dir, exist_ok=True)
            t0 = time.time()
            out = STAGE_KINDS[config[name].kind](config, name, current, stage_dir, text)
            if out is None:
                return {"stages": records, "stopped": name, "workdir": os.path.abspath(workdir)}
            if text is None:
                text = eval_text(config, workdir)
            measured = out.pop("measured", None) or measure(config, out["hf_dir"], text, name)
            record = {"name": name, "kind": config[name].kind, **measured, **out,
                      "seconds": round(time.time() - t0, 3)}
            publish.write_text(record_path, json.dumps(record))
        records.append(record)
        current = record["hf_dir"]
    plots.write_plots(workdir, records)
    keys = ("name", "sparsity", "perplexity", "tokens", "seconds")
    return {"stages": [{k: r.get(k) for k in keys} for r in records], "hf_dir": current,
            "workdir": os.path.abspath(workdir)}
