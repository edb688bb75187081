"""Hugging Face export of a training run: at the end of `train`, or later from a workdir.

`python -m launch.export --workdir=DIR` writes `DIR/hf` from the newest checkpoint in
`DIR/checkpoints`, with the tokenizer the run saved in `DIR/tokenizer`. Everything needed
(model architecture, optimizer settings to describe the saved state) is read from the
checkpoint itself, so the command takes no config.
"""

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections

from sparse_llama.ground.publish import publish_dir
from sparse_llama.model import hf_io, llama, sharding
from sparse_llama.model.config import LlamaConfig, RopeScaling
from sparse_llama.sparse_io.report import format_report
from sparse_llama.sparse_io.sparse_export import save_sparse_hf
from sparse_llama.train.checkpoint import Checkpoints


def save_tokenizer(tokenizer, source_dir: str | None, workdir: str) -> str:
    """Keep the run's tokenizer in `<workdir>/tokenizer` (once; process 0) and return it.

    A source directory's files are copied as they are (its chat template and settings stay);
    otherwise the tokenizer is written by its own `save`.
    """
    target = Path(workdir) / "tokenizer"
    if jax.process_index() == 0 and not (target / "tokenizer.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tokenizer.tmp-", dir=target.parent))
        try:
            if source_dir is not None:
                for name in hf_io.TOKENIZER_FILES:  # the list every writer carries
                    if (Path(source_dir) / name).is_file():
                        shutil.copy2(Path(source_dir) / name, tmp / name)
            else:
                tokenizer.save(tmp)
            shutil.rmtree(target, ignore_errors=True)
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def export_params(params: dict, model: LlamaConfig, out_dir: str, *,
                  tokenizer_dir: str | None) -> Path:
    """Write `params` as a Hugging Face checkpoint, whole or not at all. Every process of a
    multi-host run calls it with its sharded params: each tensor is gathered on its own and
    process 0 writes (hf_io.write_hf), so no host ever holds the whole model."""
    return publish_dir(out_dir, lambda staging: hf_io.write_hf(
        params, model, staging, tokenizer_dir=tokenizer_dir))


def export_sparse(params: dict, masks: dict, model: LlamaConfig, out_dir: str, *,
                  tokenizer_dir: str | None) -> Path:
    """`export_params` for a sparse run: weights with exact zeros, `masks/` and
    `sparsity_report.json` in one directory, written whole (sparse_io/sparse_export.py)."""
    out, _ = save_sparse_hf(params, model, out_dir, masks=masks, tokenizer_dir=tokenizer_dir)
    return out


def export_run(params: dict, masks: dict | None, model: LlamaConfig, out_dir: str, *,
               tokenizer_dir: str | None) -> tuple[str, dict | None]:
    """(the exported HF directory, its sparsity report or None): `export_params` for a dense
    run, `export_sparse` (masks, report) for one that kept `masks`; process 0 prints the
    report. A sparse run's export holds its masks and sparsity report beside the weights, so
    the next stage of a recipe starts from it as from a `launch.prune` output."""
    if masks is None:
        return str(export_params(params, model, out_dir, tokenizer_dir=tokenizer_dir)), None
    out = export_sparse(params, masks, model, out_dir, tokenizer_dir=tokenizer_dir)
    report = None
    if jax.process_index() == 0:  # the writer (other hosts may not share its filesystem)
        with open(out / "sparsity_report.json") as f:
            report = json.load(f)
        print(format_report(report), flush=True)
    return str(out), report


def model_from_saved(arch: dict) -> LlamaConfig:
    """The LlamaConfig stored in a checkpoint's `model` item."""
    arch = dict(arch)
    if arch.get("rope_scaling") is not None:
        arch["rope_scaling"] = RopeScaling(**arch["rope_scaling"])
    return LlamaConfig(**arch)


def _saved_settings(checkpoints: Checkpoints) -> tuple[LlamaConfig, ml_collections.ConfigDict]:
    """(model, run config) of the newest step whose two JSON items read back.

    Every step of a workdir holds the same model and run settings; a damaged newest step must
    not stop the export of an older intact one (restore_latest skips it the same way).
    """
    for step in sorted(checkpoints.all_steps(), reverse=True):
        try:
            return (model_from_saved(checkpoints.saved_model(step)),
                    ml_collections.ConfigDict(checkpoints.saved_config(step)))
        except Exception:  # a damaged step; restore_latest names it
            continue
    raise ValueError(f"no checkpoint in {checkpoints.directory} has a readable model and "
                     "config: every step is damaged")


def export_latest(workdir: str, out_dir: str | None = None, *,
                  held_instead: Callable[[ml_collections.ConfigDict], str | None]) -> dict:
    """Export the newest intact checkpoint of `workdir` to `out_dir` (default `<workdir>/hf`).

    `held_instead(run_config)` says what a run's checkpoints hold when it is not the model (a
    soft prompt, LoRA adapters; the objective registry knows): such a workdir is refused.

    Only the params (and the masks of a sparse run) are read back, so any objective's run
    exports (SAT, distillation) without rebuilding its optimizer. A damaged newer step is
    skipped with a warning naming it (and left in place).
    """
    checkpoints = Checkpoints(workdir, read_only=True)
    try:
        if checkpoints.latest_step() is None:
            raise FileNotFoundError(f"no checkpoint in {checkpoints.directory}; train first")
        model, run = _saved_settings(checkpoints)
        what = held_instead(run)
        if what is not None:
            raise ValueError(f"{workdir} trained {what} of a frozen model, not the model: its "
                             "outputs are written when the run ends (rerun the same training "
                             "command; it resumes from the newest checkpoint and finishes)")
        mesh_cfg = {"data": -1, "fsdp": 1, "tensor": 1, "rules": dict(run.mesh.rules)}
        mesh = sharding.make_mesh(mesh_cfg)
        rules = sharding.rules_from_config(mesh_cfg)
        shapes = jax.eval_shape(lambda: llama.init_params(
            jax.random.key(0), model, jnp.dtype(run.model.param_dtype)))
        param_sh = sharding.param_shardings(shapes, mesh, rules)
        step, params, masks = checkpoints.restore_model_arrays_latest(param_sh, model=model)
    finally:
        checkpoints.close()
    tokenizer_dir = os.path.join(workdir, "tokenizer")
    if not os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.json")):
        tokenizer_dir = None
    out_dir = out_dir or os.path.join(workdir, "hf")
    # A sparse run's export carries its masks and sparsity report, as at its end.
    hf_dir, _ = export_run(params, masks, model, out_dir, tokenizer_dir=tokenizer_dir)
    return {"hf_dir": str(hf_dir), "step": step}
