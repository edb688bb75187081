"""INT8 for sparse models: SmoothQuant, sparsity-preserving GPTQ / RTN, the W8A8 weight type,
the quantization pass over the calibration data and the compressed-tensors layout
(docs/quantization.md)."""
