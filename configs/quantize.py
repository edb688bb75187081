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

# variant -> its `quant` keys (blocks.quant checks them)
VARIANTS = {
    "w8a8": {},
    "w8": {"activations": "none", "smoothquant_alpha": 0.0},
    "w4g128": {"bits": 4, "group_size": 128, "act_order": True, "activations": "none",
               "smoothquant_alpha": 0.0},
    "rtn8": {"method": "rtn"},
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = blocks.model()
    config.mesh = blocks.mesh()
    config.quant = blocks.quant(**blocks.pick(VARIANTS, arg, "w8a8", "configs/quantize.py"))
    config.calibration = blocks.calibration()
    config.eval = blocks.perplexity_eval()
    config.format = "hf"  # hf | compressed-tensors
    config.output_dir = ""
    config.save_dtype = ""  # compressed-tensors: dtype of the unquantized tensors
    return config
