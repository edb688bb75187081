"""Quantize a (sparse) Hugging Face Llama directory: SmoothQuant + sparsity-preserving GPTQ.

    python -m launch.quantize --config=configs/quantize.py \
        --config.model.hf_path=SPARSE_DIR --config.output_dir=OUT \
        [--config.eval.path=wiki.test.txt] [--config.format=compressed-tensors]

Variants: `:w8a8` (default: GPTQ int8 per channel, SmoothQuant alpha 0.5, dynamic per-token
int8 activations), `:w8` (int8 weights only), `:w4g128` (int4, groups of 128, act-order),
`:rtn8` (round-to-nearest W8A8, the baseline). Calibration keys are launch.prune's (128
windows of 2048 tokens from the embedded corpus by default). Pruned weights (exact zeros of
the input) stay exactly zero. format=hf writes the dequantized float32 weights (+ masks/);
format=compressed-tensors the W8A8 int-quantized layout that transformers (with the
compressed-tensors package) loads and vLLM serves (not run here).

Cost: one forward per block over the calibration set plus one GPTQ sweep per linear (about
the cost of SparseGPT); 30-110 s for the tiny preset on a shared 2-core CPU (mostly compiles).
Measured (docs/quantization.md, tiny model pruned to 50%, sparse float 22.276): GPTQ int8
22.276, W8A8 + SmoothQuant 22.286 (+0.05%), GPTQ int4 groups of 16 22.438 (RTN 22.491).
`:w4g128` needs input widths divisible by 128 (Llama-2/3 sizes; tiny: group_size=16).
Last stdout line: {"perplexity_before", "perplexity_after", "sparsity", "bits", "seconds",
"output_dir", ...}.
"""

import ml_collections

from configs import blocks
from configs import prune as prune_config

VARIANTS = {
    "w8a8": {},
    "w8": {"activations": "none", "smoothquant_alpha": 0.0},
    "w4g128": {"bits": 4, "group_size": 128, "act_order": True, "activations": "none",
               "smoothquant_alpha": 0.0},
    "rtn8": {"method": "rtn"},
}


def quant_section(**changes) -> ml_collections.ConfigDict:
    """The `quant` section (sparse_llama/quant/calibrate.py: QuantSpec)."""
    section = ml_collections.ConfigDict({
        "method": "gptq",  # gptq | rtn
        "bits": 8,  # 8 | 4
        "group_size": 0,  # 0: one scale per output channel; else inputs per scale
        "act_order": False,  # GPTQ: columns by decreasing diag(H)
        "smoothquant_alpha": 0.5,  # 0 = off; in [0, 1]
        "activations": "int8_dynamic",  # none | int8_dynamic (W8A8: bits 8, group_size 0)
        "block_size": 128,  # GPTQ lazy-update block
        "dampening": 0.01,  # GPTQ: lambda = dampening * mean(diag(H))
    })
    section.update(changes)
    return section


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "w8a8"
    if variant not in VARIANTS:
        raise ValueError(f"unknown quantize variant {variant!r}; choose one of "
                         f"{sorted(VARIANTS)}")
    base = prune_config.get_config()
    config = ml_collections.ConfigDict()
    config.model = blocks.model()
    config.mesh = blocks.mesh()
    config.quant = quant_section(**VARIANTS[variant])
    config.calibration = base.calibration
    config.eval = base.eval
    config.format = "hf"  # hf | compressed-tensors
    config.output_dir = ""
    config.save_dtype = ""  # compressed-tensors: dtype of the unquantized tensors
    return config
