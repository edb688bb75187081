"""One-shot pruning of a Hugging Face Llama directory (SparseGPT, Wanda or magnitude).

    python -m launch.prune --config=configs/prune.py \
        --config.model.hf_path=DIR --config.output_dir=OUT [--config.eval.path=wiki.test.txt]

Variants: `configs/prune.py:sparsegpt50` (default), `:sparsegpt24` (2:4), `:sparsegpt70_owl`
(70% with OWL layer profile), `:wanda50`, `:magnitude50`, `:w8a8` (SparseGPT 50% and W8A8 GPTQ
with SmoothQuant in one calibration pass; docs/quantization.md). Override anything with
--config.pruning.sparsity=0.6 etc. Calibration defaults to 128 windows of 2048 tokens, seed 0
(docs/algorithms.md, "Calibration and the sequential driver"), from the embedded corpus unless
calibration.path names a text file or a .npy of token ids (num_samples, seq_len). A text with
fewer than num_samples x seq_len tokens is refused unless calibration.allow_overlap=True.

Cost: SparseGPT on Llama-2-7B is about rows*in^2 flops per linear plus one forward per block
over the calibration set: minutes on one GPU. Expected (published, Llama-2-7B wikitext2, dense
5.12): 50% SparseGPT 6.51, 2:4 10.17; Wanda 6.42 / 11.02; magnitude 14.89 / 54.59.
Output: OUT holds the pruned HF checkpoint (exact zeros), masks/ and sparsity_report.json; the
last stdout line is {"sparsity", "seconds", "perplexity_before", "perplexity_after", ...}.
"""

import ml_collections

from configs import blocks

# variant -> its `pruning` keys (blocks.pruning checks them)
VARIANTS = {
    "sparsegpt50": {"method": "sparsegpt", "sparsity": 0.5},
    "sparsegpt24": {"method": "sparsegpt", "n": 2, "m": 4},
    "sparsegpt70_owl": {"method": "sparsegpt", "sparsity": 0.7, "profile": "owl"},
    "wanda50": {"method": "wanda", "sparsity": 0.5},
    "magnitude50": {"method": "magnitude", "sparsity": 0.5},
    # SparseGPT 50%, then each linear GPTQ-quantized (W8A8, SmoothQuant 0.5) in the same pass
    "w8a8": {"method": "sparsegpt", "sparsity": 0.5},
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "sparsegpt50"
    config = ml_collections.ConfigDict()
    config.model = blocks.model()
    config.mesh = blocks.mesh()
    config.pruning = blocks.pruning(**blocks.pick(VARIANTS, variant, "sparsegpt50",
                                                  "configs/prune.py"))
    config.calibration = blocks.calibration()
    config.eval = blocks.perplexity_eval()
    config.output_dir = ""
    config.save_dtype = ""  # "" keeps the loaded dtype; float32 | bfloat16 | float16
    if variant == "w8a8":  # sparse_llama/commands/quantize.py runs it (configs/quantize.py's keys)
        config.quant = blocks.quant()
        config.format = "hf"  # hf | compressed-tensors
    return config
