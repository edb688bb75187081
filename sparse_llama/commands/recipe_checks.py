"""A recipe's up-front checks (commands/recipe.py runs them before its first stage): every
stage's config built and checked against the start's config.json (or preset) and each prune
stage's own output directory, and a first sparse stage's start measured (`checkpoint_sparsity`:
its masks file or its exact zeros, read on the host tensor by tensor)."""

import json
import os
from pathlib import Path

import ml_collections

from sparse_llama import loading
from sparse_llama.adapters import objective as adapters
from sparse_llama.commands import prune as prune_run
from sparse_llama.commands.recipe_configs import (
    first_model_stage,
    held_out_text,
    prune_config,
    prune_target,
    read_eval_path,
    skipped,
    soft_prompt_config,
    train_config,
)
from sparse_llama.data import pipeline
from sparse_llama.model import hf_io
from sparse_llama.model.config import LlamaConfig, check_context
from sparse_llama.train import config_checks, run_setup, sparse_start

# No tokenizer averages this many bytes per token: a text of at least this many bytes per
# window token has a window, and only a shorter one is tokenized up front (check_recipe).
_BYTES_PER_TOKEN_BOUND = 64


def checkpoint_sparsity(hf_dir: str) -> tuple[float, str]:
    """(fraction of the target weights pruned, what it was read from) of a checkpoint
    directory (`sparse_start.checkpoint_sparsity`: its masks file, else its exact zeros, read
    on the host one tensor at a time)."""
    masks_dir = Path(hf_dir) / "masks"
    source = f"its masks file ({masks_dir})" if masks_dir.is_dir() else "its exact zeros"
    return sparse_start.checkpoint_sparsity(hf_dir), source


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
    if sparsity < sparse_start.SPARSE_CHECKPOINT_MIN:
        raise ValueError(
            f"stage {name!r} trains sparse, keeping the mask of model.hf_path="
            f"{config.model.hf_path!r}, which is {sparsity:.3f} sparse (measured from "
            f"{source}), not a sparse model (under "
            f"{sparse_start.SPARSE_CHECKPOINT_MIN:.0%} pruned); put a prune stage first, set config.{name}."
            f"mask_init, or start from a pruned model (a launch.prune output)")


def _check_eval_text(config) -> None:
    """Every stage is measured on the eval text: it must hold one window of eval.seq_len
    tokens. Only a text too short for the byte bound is tokenized (the run's tokenizer)."""
    seq_len, path = config.eval.seq_len, config.data.eval_path
    if path:
        if os.path.getsize(path) >= _BYTES_PER_TOKEN_BOUND * seq_len:
            return
        text = read_eval_path(config, path)
    else:
        text = held_out_text(config)
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


def check_recipe(config: ml_collections.ConfigDict, workdir: str, kinds) -> None:
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
        if kind not in kinds:
            raise ValueError(f"config.{name}.kind={kind!r} is not a stage kind; use one of "
                             f"{sorted(kinds)}")
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
            target = prune_target(run)
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
    first = first_model_stage(config, run_only=True)
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
