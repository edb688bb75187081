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

import jax
import ml_collections
import numpy as np
from absl import logging

from sparse_llama import loading
from sparse_llama.commands import eval as eval_run
from sparse_llama.commands import prune as prune_run
from sparse_llama.commands import recipe_plots as plots
from sparse_llama.commands import train as train_command
from sparse_llama.commands.recipe_checks import check_recipe, model_sparsity
from sparse_llama.commands.recipe_configs import (
    eval_text,
    model_section,
    prune_config,
    prune_target,
    skipped,
    soft_prompt_config,
    train_config,
)
from sparse_llama.data import pipeline
from sparse_llama.data.tokenizer import load_tokenizer
from sparse_llama.ground import publish
from sparse_llama.model import soft_prompt
from sparse_llama.sparse_io import mask_io
from sparse_llama.sparse_io.report import format_report, sparsity_report
from sparse_llama.sparse_io.sparse_export import save_sparse_hf
from sparse_llama.sparsity import masks as masks_lib

RECORD = "stage.json"


def measure(config: ml_collections.ConfigDict, hf_dir: str, text: str, label: str,
            prompt_path: str = "") -> dict:
    """{"sparsity", "perplexity"} of the model in `hf_dir` (weights counted, launch.eval's
    perplexity protocol; with the soft prompt of `prompt_path` before every window when
    given), logging its sparsity report."""
    bundle = loading.load_model(model_section(config, hf_dir))
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
    target = prune_target(run)
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
    bundle = loading.load_model(model_section(config, hf_path))
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
    check_recipe(config, workdir, tuple(STAGE_KINDS))
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
