"""`launch.prune`: one-shot pruning of a model directory, from an ml-collections config.

Writes to `output_dir`: a Hugging Face directory whose pruned weights are exact zeros
(transformers loads it as is; tokenizer files copied), `masks/` (one bit per weight,
sparse_io/mask_io.py) and `sparsity_report.json`. With `eval.path`, perplexity before and after,
as `launch.eval` computes it, from the same layer-streamed pass. With `pruning.keep_zeros`
(the default) the old mask stays pruned: `<hf_path>/masks` when present, else the exact zeros
(sparse_io/starting_masks.py, as launch.quantize).

The output directory appears whole or not at all: it is built aside (`.<name>.partial` in the
same parent) and renamed into place once, so a kill never leaves a checkpoint that looks
complete without its masks or report. A previous output there (it holds a config.json) is
replaced; any other non-empty directory is refused before work starts. Summary values are
finite numbers or None, never NaN (JSON has no NaN).

The `pruning`, `calibration` and `eval` sections become typed specs here (`check_prune_config`,
before anything is loaded); the method's own `pruning.*` keys configure its record
(pruning/methods.py). A config with a `quant` section (configs/prune.py:w8a8) prunes and
quantizes in one pass: that is commands/quantize.py's `run` (launch.prune picks it), which
reads these sections with the functions here.
"""

import dataclasses
import math
import os
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from tqdm import tqdm

from sparse_llama import loading
from sparse_llama.commands import eval as eval_run
from sparse_llama.data.tokenizer import check_vocab, load_tokenizer
from sparse_llama.eval import perplexity as perplexity_lib
from sparse_llama.ground import publish
from sparse_llama.ground.compilation import CompileClock
from sparse_llama.ground.sections import spec_from_section
from sparse_llama.model import hf_io, sharding
from sparse_llama.model.config import LlamaConfig, check_context
from sparse_llama.pruning import calibration, driver, methods, profiles, stream
from sparse_llama.pruning.method import Method
from sparse_llama.quant import compressed_tensors
from sparse_llama.sparse_io import report as report_lib
from sparse_llama.sparse_io.starting_masks import starting_masks


@dataclasses.dataclass(frozen=True)
class PruningSection:
    """The `pruning` keys every method shares (configs/blocks.py: their defaults and meaning).
    A method's own keys (SparseGPT's block_size, dampening) configure its record instead."""

    method: str
    sparsity: float
    n: int
    m: int
    profile: str
    owl_m: float
    owl_lambda: float
    layer_sparsities: tuple[float, ...]
    module_sparsity: tuple[tuple[str, float], ...]  # (module, sparsity) pairs, sorted
    true_sequential: bool
    keep_zeros: bool

    def __post_init__(self):
        methods.get(self.method)  # an unknown name is refused, naming the methods
        profiles.check_sparsity(self.sparsity)
        if self.profile not in profiles.PROFILES:
            raise ValueError(f"pruning.profile={self.profile!r} is not one of "
                             f"{profiles.PROFILES}")
        if (self.n, self.m) != (0, 0) and not 0 < self.n < self.m:
            raise ValueError(f"pruning.n={self.n}, pruning.m={self.m}: N:M needs 0 < N < M "
                             "(e.g. 2:4); use n=m=0 for unstructured")
        if self.n and self.profile != "uniform":
            raise ValueError("an N:M pattern fixes the sparsity at N/M; use "
                             "pruning.profile=uniform")
        if not 0 <= self.owl_lambda < 1 or self.owl_m <= 0:
            raise ValueError(f"pruning.owl_lambda={self.owl_lambda} must be in [0, 1) and "
                             f"pruning.owl_m={self.owl_m} positive (defaults 0.08 and 5)")
        for key, value in self.module_sparsity:
            profiles.check_sparsity(value, f"pruning.module_sparsity.{key}")


@dataclasses.dataclass(frozen=True)
class CalibrationSection:
    """The `calibration` section (configs/blocks.py: defaults and meaning)."""

    path: str
    num_samples: int
    seq_len: int
    seed: int
    batch_size: int
    allow_overlap: bool

    def __post_init__(self):
        if self.path and not os.path.isfile(self.path):
            raise FileNotFoundError(f"calibration.path={self.path!r} is not a file (a text "
                                    "file or a .npy array of token ids)")
        if self.num_samples < 1 or self.seq_len < 2 or self.batch_size < 1:
            raise ValueError("calibration.num_samples and calibration.batch_size must be >= 1 "
                             f"and calibration.seq_len >= 2; got {self.num_samples}, "
                             f"{self.batch_size}, {self.seq_len}")


@dataclasses.dataclass(frozen=True)
class EvalSection:
    """The `eval` section: perplexity before and after, as launch.eval computes it."""

    path: str
    seq_len: int
    batch_size: int

    def __post_init__(self):
        if self.path and not os.path.isfile(self.path):
            raise FileNotFoundError(f"eval.path={self.path!r} is not a file")


class Sections(NamedTuple):
    """A launch.prune (or launch.quantize) config's typed sections."""

    calibration: CalibrationSection
    eval: EvalSection
    pruning: PruningSection | None = None  # None: quantizing only
    method: Method | None = None  # the pruning method's record, configured


def pruning_section(section: ml_collections.ConfigDict) -> tuple[PruningSection, Method]:
    """The typed `pruning` section and its method's record, configured with the method's own
    keys (unknown keys are refused). Every registered method's keys may be in the section
    (configs/prune.py sets SparseGPT's for every method); only the chosen one's are read."""
    own = {key for method in methods.METHODS.values() for key in method.keys}
    values = {k: v for k, v in section.items() if k not in own}
    if "module_sparsity" in values:
        values["module_sparsity"] = tuple(sorted(
            (k, float(v)) for k, v in dict(values["module_sparsity"]).items()))
    if "layer_sparsities" in values:
        values["layer_sparsities"] = tuple(float(s) for s in values["layer_sparsities"])
    pruning = spec_from_section(PruningSection, values, "pruning")
    method = methods.get(pruning.method)
    params = spec_from_section(type(method.params),
                               {k: section[k] for k in method.keys if k in section}, "pruning")
    method.check(params, pruning.n, pruning.m)
    return pruning, method._replace(params=params)


def check_prune_config(config: ml_collections.ConfigDict) -> Sections:
    """Every value that could stop the run later is checked here, before loading anything;
    returns the typed sections."""
    loading.check_model_section(config.model)
    pruning, method = pruning_section(config.pruning)
    return check_calibration_and_outputs(config)._replace(pruning=pruning, method=method)


def check_calibration_and_outputs(config: ml_collections.ConfigDict) -> Sections:
    """The calibration, eval and output_dir sections (launch.prune and launch.quantize)."""
    sections = Sections(spec_from_section(CalibrationSection, config.calibration, "calibration"),
                        spec_from_section(EvalSection, config.eval, "eval"))
    if not config.output_dir:
        raise ValueError("output_dir is empty; pass --config.output_dir=DIR for the pruned model")
    publish.check_replaceable(config.output_dir, "output_dir")
    if config.model.hf_path and (os.path.realpath(config.output_dir)
                                 == os.path.realpath(config.model.hf_path)):
        raise ValueError("output_dir is model.hf_path: writing there would replace the dense "
                         "checkpoint being pruned; choose another --config.output_dir")
    return sections


def layer_sparsities(sections: Sections, block, embed_tokens, model: LlamaConfig, windows,
                     mesh, rules) -> np.ndarray:
    """Each block's sparsity; OWL's come from a dense pass over the calibration windows
    (`block(i)`: block i's weights; `embed_tokens()`: the embedding table, read only then)."""
    p, n_layers = sections.pruning, model.num_layers
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
                                      sections.calibration.batch_size)
        ratios = driver.owl_outlier_ratios(block, inputs, model, m=p.owl_m, mesh=mesh,
                                           rules=rules, progress=lambda _: bar.update())
    logging.info("OWL outlier ratios: %s", np.round(ratios, 4).tolist())
    return profiles.owl(ratios, p.sparsity, p.owl_lambda)


def check_against_model(model: LlamaConfig, sections: Sections) -> None:
    """Window lengths (and an explicit profile's length) against the model, from its
    config.json alone (no weights)."""
    p = sections.pruning
    if p is not None and p.profile == "list" and not p.n:
        profiles.explicit(list(p.layer_sparsities), model.num_layers)
    checks = [("calibration.seq_len", sections.calibration.seq_len)]
    if sections.eval.path:
        checks.append(("eval.seq_len", sections.eval.seq_len))
    for key, seq_len in checks:
        check_context(seq_len, model, key)


def _tokenizer(model_cfg: ml_collections.ConfigDict):
    """(the tokenizer of model.hf_path or None, the directory holding it or None)."""
    tokenizer_dir = (model_cfg.hf_path if model_cfg.hf_path and os.path.isfile(
        os.path.join(model_cfg.hf_path, "tokenizer.json")) else None)
    return (load_tokenizer(tokenizer_dir) if tokenizer_dir else None), tokenizer_dir


def _calibration(c: CalibrationSection, model: LlamaConfig, tokenizer):
    return calibration.calibration_windows(
        c.path, tokenizer, num_samples=c.num_samples, seq_len=c.seq_len, seed=c.seed,
        vocab_size=model.vocab_size, allow_overlap=c.allow_overlap)


def _eval_text(e: EvalSection, tokenizer) -> str | None:
    if not e.path:
        return None
    if tokenizer is None:
        raise ValueError("eval.path needs the model's tokenizer.json in model.hf_path")
    with open(e.path, encoding="utf-8") as f:
        return f.read()


def load_inputs(config: ml_collections.ConfigDict, sections: Sections):
    """(calibration windows, the whole model bundle, `perplexity(params, desc)`), for a pass
    that needs the model in memory (launch.quantize): the calibration first, from config.json
    and the tokenizer alone, so a bad calibration text is refused before the weights are
    read. `perplexity` gives None without eval.path.
    """
    model_cfg = config.model
    tokenizer, _ = _tokenizer(model_cfg)
    windows = _calibration(sections.calibration, loading.model_config(model_cfg), tokenizer)
    bundle = loading.load_model(model_cfg)
    eval_text = _eval_text(sections.eval, tokenizer)

    def perplexity(params, desc):
        if eval_text is None:
            return None
        model = loading.ModelBundle(bundle.config, params, bundle.tokenizer_dir)
        return eval_run.evaluate_text(model, tokenizer, eval_text, sections.eval.seq_len,
                                      batch_size=sections.eval.batch_size, mesh_cfg=config.mesh,
                                      desc=desc).perplexity

    return windows, bundle, perplexity


def _model_source(model_cfg: ml_collections.ConfigDict) -> stream.Source:
    """The model read block by block from model.hf_path (only the headers now), or a preset
    model in memory. A compressed-tensors checkpoint is dequantized whole (its int8 layout is
    not read block by block)."""
    if model_cfg.hf_path and not compressed_tensors.is_compressed_tensors(model_cfg.hf_path):
        return stream.checkpoint_source(hf_io.open_checkpoint(model_cfg.hf_path),
                                        jnp.dtype(model_cfg.param_dtype))
    return stream.params_source(loading.load_model(model_cfg).params)


def prune_spec(sections: Sections, sparsities) -> driver.PruneSpec:
    """The driver's PruneSpec of the typed sections, with per-layer sparsities."""
    p = sections.pruning
    return driver.PruneSpec(
        method=sections.method, layer_sparsity=tuple(float(s) for s in sparsities), n=p.n,
        m=p.m, module_sparsity=p.module_sparsity, true_sequential=p.true_sequential,
        batch_size=sections.calibration.batch_size)


def run(config: ml_collections.ConfigDict) -> dict:
    """Prune `model` as `config` says and write `output_dir`; returns the summary dict.

    The model is read, pruned and written block by block (pruning/stream.py): host memory
    holds the embeddings and head, one block and the calibration activations, not the model.
    Summary keys: sparsity, seconds, prune_seconds (the layer-by-layer pass, writing included)
    split into prune_compile_seconds (XLA compiles inside it; ~0 when the persistent cache has
    them) and prune_compute_seconds, perplexity_before, perplexity_after (None without
    eval.path, or when not finite), method, output_dir.
    """
    if "quant" in config:
        raise ValueError("this config has a `quant` section: pruning and quantizing in one pass "
                         "is sparse_llama.commands.quantize.run (launch.prune runs it)")
    sections = check_prune_config(config)
    model = loading.model_config(config.model)
    check_against_model(model, sections)
    p = sections.pruning
    starting = starting_masks(config.model.hf_path, p.keep_zeros)
    stream.return_freed_memory()  # before the first large buffer
    start = time.time()
    tokenizer, tokenizer_dir = _tokenizer(config.model)
    windows = _calibration(sections.calibration, model, tokenizer)
    eval_text = _eval_text(sections.eval, tokenizer)
    eval_windows = None
    if eval_text is not None:
        check_vocab(tokenizer, model.vocab_size)
        eval_windows = perplexity_lib.token_windows(tokenizer.encode(eval_text),
                                                    sections.eval.seq_len)
        perplexity_lib.check_token_ids(eval_windows, model.vocab_size)
    source = _model_source(config.model)
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.rules_from_config(config.mesh)
    sparsities = layer_sparsities(sections, source.block, source.embed, model, windows, mesh,
                                  rules)
    spec = prune_spec(sections, sparsities)
    dtype = config.save_dtype or config.model.param_dtype
    hf_io.check_save_dtype(dtype)
    initial = None if starting is None else starting.block
    out = os.path.abspath(config.output_dir)  # checked by check_calibration_and_outputs
    result = {}

    def write(staging):
        prune_start = time.time()
        with (tqdm(total=model.num_layers, desc=f"{p.method} pruning", unit="layer") as bar,
              CompileClock() as compiles):
            report, before, after = stream.prune_to_dir(
                source, model, windows, spec, staging, dtype=dtype, initial_masks=initial,
                mesh=mesh, rules=rules, eval_windows=eval_windows,
                eval_batch_size=sections.eval.batch_size, progress=lambda _: bar.update())
        report["layer_targets"] = [float(s) for s in sparsities]
        if jax.process_index() == 0:
            hf_io.write_hf_metadata(model, staging, dtype=dtype, tokenizer_dir=tokenizer_dir)
            publish.write_json(staging / "sparsity_report.json", report)
        result.update(report=report, before=before, after=after, compile=compiles.seconds,
                      seconds=time.time() - prune_start)

    publish.publish_dir(out, write)
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
