"""What each stage of a recipe runs (commands/recipe.py): its run config built from the recipe
(a train, prune or soft-prompt stage's config), which stage a start makes skippable, and the
eval text every stage is measured on."""

import os

import ml_collections

from sparse_llama.data import corpus, pipeline, sources
from sparse_llama.ground import publish


def model_section(config: ml_collections.ConfigDict, hf_path: str) -> ml_collections.ConfigDict:
    model = ml_collections.ConfigDict(config.model.to_dict())
    model.hf_path = hf_path
    return model


def train_config(config: ml_collections.ConfigDict, name: str, hf_path: str
                 ) -> ml_collections.ConfigDict:
    """The `commands.train` config of train stage `name` starting from `hf_path` ("" = scratch)."""
    stage = config[name]
    run = ml_collections.ConfigDict()
    run.model = model_section(config, hf_path)
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
    run.model = model_section(config, hf_path)
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


def prune_target(run: ml_collections.ConfigDict) -> float:
    """The sparsity a prune stage's config asks for (N/M for an N:M pattern)."""
    return run.pruning.n / run.pruning.m if run.pruning.n else run.pruning.sparsity


def first_model_stage(config, *, run_only: bool = False) -> str | None:
    """The first train or prune stage (`run_only`: the first one that is not skipped)."""
    for name in config.stages:
        if config[name].kind in ("train", "prune") and not (run_only and skipped(config, name)):
            return name
    return None


def skipped(config, name: str) -> bool:
    """A leading dense pretraining stage is skipped when the run starts from a checkpoint."""
    stage = config[name]
    return (bool(config.model.hf_path) and stage.kind == "train" and not stage.sparse
            and name == first_model_stage(config) and not stage.get("mask_init", ""))


def soft_prompt_config(config: ml_collections.ConfigDict, name: str, hf_path: str
                       ) -> ml_collections.ConfigDict:
    """The `commands.train` config of soft-prompt stage `name` for the model in `hf_path`."""
    run = train_config(config, name, hf_path)
    run.train.objective = "soft_prompt"
    run.soft_prompt = config[name].soft_prompt
    return run


def held_out_text(config: ml_collections.ConfigDict) -> str:
    """The embedded corpus's held-out documents joined by blank lines (at most
    `eval.max_chars` characters)."""
    parts = []
    for spec in pipeline.mixture(config.data):
        held = corpus.split(pipeline.DEFAULT_KINDS[spec.kind])[1]
        parts.extend(held[i] for i in range(len(held)))
    text = "\n\n".join(parts)
    return text[:config.eval.max_chars] if config.eval.max_chars else text


def read_eval_path(config: ml_collections.ConfigDict, path: str) -> str:
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
        return read_eval_path(config, config.data.eval_path)
    path = os.path.join(workdir, "eval_text.txt")
    if not os.path.isfile(path):
        publish.write_text(path, held_out_text(config))
    return read_eval_path(config, path)
