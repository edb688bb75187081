"""`launch.prune`: one-shot pruning of a model directory, from an ml-collections config.

Writes to `output_dir`: a Hugging Face directory whose pruned weights are exact zeros
(transformers loads it as is; tokenizer files copied), `masks/` (one bit per weight,
sparsity/mask_io.py) and `sparsity_report.json`. With `eval.path`, perplexity before and after,
as `launch.eval` computes it, from the same layer-streamed pass.

The output directory appears whole or not at all: it is built aside (`.<name>.partial` in the
same parent) and renamed into place once, so a kill never leaves a checkpoint that looks
complete without its masks or report. A previous output there (it holds a config.json) is
replaced; any other non-empty directory is refused before work starts. Summary values are
finite numbers or None, never NaN (JSON has no NaN).
"""

import math
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from tqdm import tqdm

from sparse_llama.compilation import CompileClock
from sparse_llama.data.tokenizer import check_vocab, load_tokenizer
from sparse_llama.eval import perplexity as perplexity_lib
from sparse_llama.eval import run as eval_run
from sparse_llama.model import hf_io, loading, sharding
from sparse_llama.model.config import LlamaConfig, check_context
from sparse_llama.pruning import calibration, driver, profiles, stream
from sparse_llama.sparsity import masks as masks_lib
from sparse_llama.sparsity import report as report_lib
from sparse_llama.sparsity import sparse_export


def check_prune_config(config: ml_collections.ConfigDict) -> None:
    """Every value that could stop the run later is checked here, before loading anything."""
    loading.check_model_section(config.model)
    p = config.pruning
    if p.method not in driver.METHOD_STATS:
        raise ValueError(f"pruning.method={p.method!r} is not one of "
                         f"{sorted(driver.METHOD_STATS)}")
    profiles.check_sparsity(p.sparsity)
    if p.profile not in profiles.PROFILES:
        raise ValueError(f"pruning.profile={p.profile!r} is not one of {profiles.PROFILES}")
    if (p.n, p.m) != (0, 0) and not 0 < p.n < p.m:
        raise ValueError(f"pruning.n={p.n}, pruning.m={p.m}: N:M needs 0 < N < M (e.g. 2:4); "
                         "use n=m=0 for unstructured")
    if p.n and p.profile != "uniform":
        raise ValueError("an N:M pattern fixes the sparsity at N/M; use pruning.profile=uniform")
    if not 0 <= p.owl_lambda < 1 or p.owl_m <= 0:
        raise ValueError(f"pruning.owl_lambda={p.owl_lambda} must be in [0, 1) and "
                         f"pruning.owl_m={p.owl_m} positive (defaults 0.08 and 5)")
    if p.block_size < 1 or (p.m and p.block_size % p.m):
        raise ValueError(f"pruning.block_size={p.block_size} must be positive and a multiple "
                         f"of pruning.m={p.m} (default 128)")
    if p.dampening <= 0:
        raise ValueError(f"pruning.dampening={p.dampening} must be positive (default 0.01)")
    for key, value in dict(p.module_sparsity).items():
        profiles.check_sparsity(float(value), f"pruning.module_sparsity.{key}")
    check_calibration_and_outputs(config)


def check_calibration_and_outputs(config: ml_collections.ConfigDict) -> None:
    """The calibration, eval and output_dir sections (launch.prune and launch.quantize)."""
    c = config.calibration
    if c.path and not os.path.isfile(c.path):
        raise FileNotFoundError(f"calibration.path={c.path!r} is not a file (a text file or a "
                                ".npy array of token ids)")
    if c.num_samples < 1 or c.seq_len < 2 or c.batch_size < 1:
        raise ValueError("calibration.num_samples and calibration.batch_size must be >= 1 and "
                         f"calibration.seq_len >= 2; got {c.num_samples}, {c.batch_size}, "
                         f"{c.seq_len}")
    if config.eval.path and not os.path.isfile(config.eval.path):
        raise FileNotFoundError(f"eval.path={config.eval.path!r} is not a file")
    if not config.output_dir:
        raise ValueError("output_dir is empty; pass --config.output_dir=DIR for the pruned model")
    if os.path.isfile(config.output_dir):
        raise FileExistsError(f"output_dir={config.output_dir!r} is a file")
    if (os.path.isdir(config.output_dir) and os.listdir(config.output_dir)
            and not os.path.isfile(os.path.join(config.output_dir, "config.json"))):
        # Replacing is a recursive delete: only ever of a previous checkpoint.
        raise FileExistsError(f"output_dir={config.output_dir!r} is not empty and holds no "
                              "config.json, so it is not a previous output to replace; choose "
                              "another --config.output_dir")
    if config.model.hf_path and (os.path.realpath(config.output_dir)
                                 == os.path.realpath(config.model.hf_path)):
        raise ValueError("output_dir is model.hf_path: writing there would replace the dense "
                         "checkpoint being pruned; choose another --config.output_dir")


def layer_sparsities(config, block, embed_tokens, model: LlamaConfig, windows, mesh,
                     rules) -> np.ndarray:
    """Each block's sparsity; OWL's come from a dense pass over the calibration windows
    (`block(i)`: block i's weights; `embed_tokens()`: the embedding table, read only then)."""
    p, n_layers = config.pruning, model.num_layers
    if p.n:
        return profiles.uniform(n_layers, p.n / p.m)
    if p.profile == "uniform":
        return profiles.uniform(n_layers, p.sparsity)
    if p.profile == "list":
        return profiles.explicit(list(p.layer_sparsities), n_layers)
    # A context manager: an error inside closes the bar first, so the command's `error:` line
    # stays the last line of stderr.
    with tqdm(total=n_layers, desc="OWL outlier ratios", unit="layer") as bar:
        inputs = driver.embed_windows(embed_tokens(), windows, model,
                                      config.calibration.batch_size)
        ratios = driver.owl_outlier_ratios(block, inputs, model, m=p.owl_m, mesh=mesh,
                                           rules=rules, progress=lambda _: bar.update())
    logging.info("OWL outlier ratios: %s", np.round(ratios, 4).tolist())
    return profiles.owl(ratios, p.sparsity, p.owl_lambda)


def check_against_model(config: ml_collections.ConfigDict) -> None:
    """Window lengths against the model's context, from config.json alone (no weights)."""
    model = loading.model_config(config.model)
    if config.pruning.profile == "list" and not config.pruning.n:
        profiles.explicit(list(config.pruning.layer_sparsities), model.num_layers)
    checks = [("calibration.seq_len", config.calibration.seq_len)]
    if config.eval.path:
        checks.append(("eval.seq_len", config.eval.seq_len))
    for key, seq_len in checks:
        check_context(seq_len, model, key)


def _tokenizer(model_cfg: ml_collections.ConfigDict):
    """(the tokenizer of model.hf_path or None, the directory holding it or None)."""
    tokenizer_dir = (model_cfg.hf_path if model_cfg.hf_path and os.path.isfile(
        os.path.join(model_cfg.hf_path, "tokenizer.json")) else None)
    return (load_tokenizer(tokenizer_dir) if tokenizer_dir else None), tokenizer_dir


def _calibration(config: ml_collections.ConfigDict, model: LlamaConfig, tokenizer):
    c = config.calibration
    return calibration.calibration_windows(
        c.path, tokenizer, num_samples=c.num_samples, seq_len=c.seq_len, seed=c.seed,
        vocab_size=model.vocab_size, allow_overlap=c.allow_overlap)


def _eval_text(config: ml_collections.ConfigDict, tokenizer) -> str | None:
    if not config.eval.path:
        return None
    if tokenizer is None:
        raise ValueError("eval.path needs the model's tokenizer.json in model.hf_path")
    with open(config.eval.path, encoding="utf-8") as f:
        return f.read()


def load_inputs(config: ml_collections.ConfigDict):
    """(calibration windows, the whole model bundle, `perplexity(params, desc)`), for a pass
    that needs the model in memory (launch.quantize): the calibration first, from config.json
    and the tokenizer alone, so a bad calibration text is refused before the weights are
    read. `perplexity` gives None without eval.path.
    """
    model_cfg = config.model
    tokenizer, _ = _tokenizer(model_cfg)
    windows = _calibration(config, loading.model_config(model_cfg), tokenizer)
    bundle = loading.load_model(model_cfg)
    eval_text = _eval_text(config, tokenizer)

    def perplexity(params, desc):
        if eval_text is None:
            return None
        model = loading.ModelBundle(bundle.config, params, bundle.tokenizer_dir)
        return eval_run.evaluate_text(model, tokenizer, eval_text, config.eval.seq_len,
                                      batch_size=config.eval.batch_size, mesh_cfg=config.mesh,
                                      desc=desc).perplexity

    return windows, bundle, perplexity


def _model_source(model_cfg: ml_collections.ConfigDict) -> stream.Source:
    """The model read block by block from model.hf_path (only the headers now), or a preset
    model in memory. A compressed-tensors checkpoint is dequantized whole (its int8 layout is
    not read block by block)."""
    from sparse_llama.quant import compressed_tensors

    if model_cfg.hf_path and not compressed_tensors.is_compressed_tensors(model_cfg.hf_path):
        return stream.checkpoint_source(hf_io.open_checkpoint(model_cfg.hf_path),
                                        jnp.dtype(model_cfg.param_dtype))
    return stream.params_source(loading.load_model(model_cfg).params)


def prune_spec(config: ml_collections.ConfigDict, sparsities) -> driver.PruneSpec:
    """The driver's PruneSpec of the `pruning` section, with per-layer sparsities."""
    p = config.pruning
    return driver.PruneSpec(
        method=p.method, layer_sparsity=tuple(float(s) for s in sparsities), n=p.n, m=p.m,
        block_size=p.block_size, dampening=p.dampening,
        module_sparsity=tuple(sorted((k, float(v)) for k, v in dict(p.module_sparsity).items())),
        true_sequential=p.true_sequential, batch_size=config.calibration.batch_size)


def run(config: ml_collections.ConfigDict) -> dict:
    """Prune `model` as `config` says and write `output_dir`; returns the summary dict.

    The model is read, pruned and written block by block (pruning/stream.py): host memory
    holds the embeddings and head, one block and the calibration activations, not the model.
    Summary keys: sparsity, seconds, prune_seconds (the layer-by-layer pass, writing included)
    split into prune_compile_seconds (XLA compiles inside it; ~0 when the persistent cache has
    them) and prune_compute_seconds, perplexity_before, perplexity_after (None without
    eval.path, or when not finite), method, output_dir.
    """
    if "quant" in config:  # configs/prune.py:w8a8: prune and quantize in one pass
        from sparse_llama.quant import run as quant_run

        return quant_run.run(config)
    check_prune_config(config)
    check_against_model(config)
    stream.return_freed_memory()  # before the first large buffer
    start = time.time()
    model = loading.model_config(config.model)
    tokenizer, tokenizer_dir = _tokenizer(config.model)
    windows = _calibration(config, model, tokenizer)
    eval_text = _eval_text(config, tokenizer)
    eval_windows = None
    if eval_text is not None:
        check_vocab(tokenizer, model.vocab_size)
        eval_windows = perplexity_lib.token_windows(tokenizer.encode(eval_text),
                                                    config.eval.seq_len)
        perplexity_lib.check_token_ids(eval_windows, model.vocab_size)
    source = _model_source(config.model)
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.rules_from_config(config.mesh)
    sparsities = layer_sparsities(config, source.block, source.embed, model, windows, mesh,
                                  rules)
    p = config.pruning
    spec = prune_spec(config, sparsities)
    dtype = config.save_dtype or config.model.param_dtype
    hf_io.check_save_dtype(dtype)
    initial = (lambda _, block: masks_lib.masks_from_zeros(block)) if p.keep_zeros else None
    out = os.path.abspath(config.output_dir)  # checked by check_calibration_and_outputs
    result = {}

    def write(staging):
        prune_start = time.time()
        with (tqdm(total=model.num_layers, desc=f"{p.method} pruning", unit="layer") as bar,
              CompileClock() as compiles):
            report, before, after = stream.prune_to_dir(
                source, model, windows, spec, staging, dtype=dtype, initial_masks=initial,
                mesh=mesh, rules=rules, eval_windows=eval_windows,
                eval_batch_size=config.eval.batch_size, progress=lambda _: bar.update())
        report["layer_targets"] = [float(s) for s in sparsities]
        if jax.process_index() == 0:
            hf_io.write_hf_metadata(model, staging, dtype=dtype, tokenizer_dir=tokenizer_dir)
            sparse_export.write_json(staging / "sparsity_report.json", report)
        result.update(report=report, before=before, after=after, compile=compiles.seconds,
                      seconds=time.time() - prune_start)

    sparse_export.publish_dir(out, write)
    print(report_lib.format_report(result["report"]), flush=True)
    return {"sparsity": finite_or_none(result["report"]["overall"]),
            "seconds": round(time.time() - start, 3),
            "prune_seconds": round(result["seconds"], 3),
            "prune_compile_seconds": round(result["compile"], 3),
            "prune_compute_seconds": round(max(result["seconds"] - result["compile"], 0.0), 3),
            "perplexity_before": finite_or_none(result["before"]),
            "perplexity_after": finite_or_none(result["after"]), "method": p.method,
            "output_dir": out}


def finite_or_none(value):
    """A JSON-safe summary number: None stands for missing, NaN and inf alike."""
    return None if value is None or not math.isfinite(value) else float(value)
