"""`launch.quantize` (and `launch.prune` with a `quant` section, configs/prune.py:w8a8):
quantize a (sparse) model directory, optionally pruning it in the same calibration pass.

Writes `output_dir` whole or not at all: `format=hf`, a Hugging Face directory of the
dequantized float32 weights (pruned entries exact zeros) with masks/ and sparsity_report.json;
`format=compressed-tensors`, the W8A8 int-quantized layout (quant/compressed_tensors.py) with
the same masks/ and report. With `eval.path`, perplexity before (the float model) and after
(the quantized model as it runs: the W8A8 forward with `activations=int8_dynamic`, else the
dequantized weights), as `launch.eval` computes it. Summary: perplexity_before,
perplexity_after, sparsity (exact zeros of the dequantized targeted weights), bits, seconds,
output_dir, and method, format, activations, smoothquant_alpha, zeros_kept (every weight the
starting mask prunes is 0 in the output).

The starting mask is launch.prune's (sparse_io/starting_masks.py): `<hf_path>/masks` when
present (a kept weight that is exactly zero stays kept and may move), else the exact zeros;
with a `pruning` section and `pruning.keep_zeros=False`, none.

The `quant` section becomes `calibrate.QuantSpec`; `calibration`, `eval` and `pruning` are
read as launch.prune reads them (commands/prune.py, imported here; it never imports this).
"""

import time

import jax
import jax.numpy as jnp
import ml_collections
from tqdm import tqdm

from sparse_llama import loading
from sparse_llama.commands import prune as prune_run
from sparse_llama.ground.sections import spec_from_section
from sparse_llama.model import sharding
from sparse_llama.pruning import driver
from sparse_llama.quant import calibrate, w8a8
from sparse_llama.quant import compressed_tensors as ct
from sparse_llama.sparse_io import report as report_lib
from sparse_llama.sparse_io.sparse_export import save_sparse_hf
from sparse_llama.sparse_io.starting_masks import starting_masks
from sparse_llama.sparsity import masks as masks_lib

FORMATS = ("hf", "compressed-tensors")


def check_quantize_config(config: ml_collections.ConfigDict
                          ) -> tuple[calibrate.QuantSpec, prune_run.Sections]:
    """Every value that could stop the run later, before loading anything; returns the typed
    `quant` section and the others (`pruning` among them only when the config has one)."""
    if "pruning" in config:
        sections = prune_run.check_prune_config(config)
        if sections.pruning.true_sequential:
            raise ValueError("pruning.true_sequential is not supported when pruning and "
                             "quantizing in one pass; set pruning.true_sequential=False")
    else:
        loading.check_model_section(config.model)
        sections = prune_run.check_calibration_and_outputs(config)
    loading.require_hf_path(config.model)
    spec = spec_from_section(calibrate.QuantSpec, config.quant, "quant")
    if config.format not in FORMATS:
        raise ValueError(f"format={config.format!r} is not one of {FORMATS}")
    if config.format == "compressed-tensors" and spec.activations != "int8_dynamic":
        raise ValueError("format=compressed-tensors writes the W8A8 int-quantized layout: set "
                         "quant.activations=int8_dynamic (with quant.bits=8, group_size=0), or "
                         "use format=hf")
    if ct.quantization_config(config.model.hf_path) is not None:
        raise ValueError(f"model.hf_path={config.model.hf_path!r} is already quantized (its "
                         "config.json has a quantization_config); quantize the float checkpoint")
    model = loading.model_config(config.model)
    calibrate.check_against_model(spec, model)
    c = sections.calibration
    tokens = c.num_samples * c.seq_len
    width = max(model.hidden_size, model.q_width, model.intermediate_size)
    if spec.method == "gptq" and tokens < width and not c.path.endswith(".npy"):
        raise ValueError(f"calibration too short: {c.num_samples} x {c.seq_len} = {tokens} "
                         f"tokens cannot give full-rank Hessians of width {width}; raise "
                         "calibration.num_samples or calibration.seq_len")
    prune_run.check_against_model(model, sections)
    return spec, sections


def _zeros_kept(masks: dict, after: dict) -> bool:
    """Every weight the starting masks prune is exactly 0 in the output."""
    return all(bool(jnp.all(jnp.where(m, True, w == 0)))
               for m, w in zip(jax.tree.leaves(masks), jax.tree.leaves(after), strict=True))


def run(config: ml_collections.ConfigDict) -> dict:
    """Quantize (and with a `pruning` section, first prune) as `config` says; the summary."""
    spec, sections = check_quantize_config(config)
    keep = sections.pruning is None or sections.pruning.keep_zeros
    starting = starting_masks(config.model.hf_path, keep)
    start = time.time()
    windows, bundle, perplexity = prune_run.load_inputs(config, sections)
    model = bundle.config
    if spec.method == "gptq" and windows.size < max(model.hidden_size, model.intermediate_size):
        raise ValueError(f"calibration too short: {windows.size} tokens in calibration.path "
                         "for Hessians of width "
                         f"{max(model.hidden_size, model.intermediate_size)}; give more windows")
    existing = (masks_lib.dense_masks(bundle.params) if starting is None
                else starting.tree(bundle.params))
    ppl_before = perplexity(bundle.params, "eval (float)")
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.rules_from_config(config.mesh)
    prune = None
    if sections.pruning is not None:
        prune = prune_run.prune_spec(
            sections, prune_run.layer_sparsities(
                sections, driver.blocks_of(bundle.params), lambda: bundle.params["embed_tokens"],
                bundle.config, windows, mesh, rules))
    quant_start = time.time()
    with tqdm(total=bundle.config.num_layers, desc=f"{spec.method} int{spec.bits}",
              unit="layer") as bar:
        params, masks, scales = calibrate.quantize_model(
            bundle.params, bundle.config, windows, spec, prune=prune, masks=existing,
            batch_size=sections.calibration.batch_size, mesh=mesh,
            rules=rules, progress=lambda _: bar.update())
        jax.block_until_ready(params)
    quant_seconds = time.time() - quant_start
    report = report_lib.sparsity_report(params)
    print(report_lib.format_report(report), flush=True)
    w8a8_model = spec.activations == "int8_dynamic"
    runs = w8a8.quantize_params(params, scales) if w8a8_model else params
    tok_dir = bundle.tokenizer_dir
    if config.format == "compressed-tensors":
        out = ct.save_compressed(params, scales, bundle.config, config.output_dir, masks=masks,
                                 tokenizer_dir=tok_dir, dtype=config.save_dtype or None,
                                 report=report)
    else:
        out, _ = save_sparse_hf(params, bundle.config, config.output_dir, masks=masks,
                                tokenizer_dir=tok_dir, dtype="float32", report=report)
    ppl_after = perplexity(runs, "eval (W8A8)" if w8a8_model else "eval (quantized)")
    finite = prune_run.finite_or_none
    return {"perplexity_before": finite(ppl_before), "perplexity_after": finite(ppl_after),
            "sparsity": finite(report["overall"]), "bits": spec.bits,
            "seconds": round(time.time() - start, 3),
            "quantize_seconds": round(quant_seconds, 3), "output_dir": str(out),
            "method": spec.method, "format": config.format, "activations": spec.activations,
            "smoothquant_alpha": spec.smoothquant_alpha,
            "pruning": None if sections.pruning is None else sections.pruning.method,
            "zeros_kept": _zeros_kept(existing, params)}
