"""The quantization pass: SmoothQuant, GPTQ or RTN (optionally after pruning each linear) over
the calibration data, block by block, through the pruning driver (docs/quantization.md).

Per block, as the driver runs it (`driver.prune_model` with a `driver.LinearPass`):
  1. with smoothquant_alpha > 0: the max |x_j| of the q/k/v and gate/up inputs, then the
     block is smoothed (`smoothquant.smooth_block`; the float block computes the same);
  2. the Hessian of every linear's input (of the smoothed block);
  3. each linear: pruned first when the pass also prunes (the pruning method's solver on the
     same Hessian), then quantized with its mask: pruned entries stay exactly 0;
  4. the quantized (dequantized float) block produces the next block's inputs.
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from sparse_llama.model.config import LlamaConfig
from sparse_llama.pruning import driver, hessian
from sparse_llama.quant import gptq, smoothquant
from sparse_llama.sparsity.masks import masks_from_zeros

BITS = (4, 8)
ACTIVATIONS = ("none", "int8_dynamic")


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    method: str = "gptq"  # gptq | rtn
    bits: int = 8
    group_size: int = 0  # 0: one scale per output channel
    act_order: bool = False  # GPTQ: columns by decreasing diag(H)
    smoothquant_alpha: float = 0.0  # 0 = off
    activations: str = "none"  # none | int8_dynamic (W8A8)
    block_size: int = 128  # GPTQ lazy-update block
    dampening: float = 0.01  # lambda = dampening * mean(diag(H))

    def __post_init__(self):
        check_spec(self)


def check_spec(spec: QuantSpec) -> None:
    """One-line errors for every value that could not run, before any work."""
    if spec.method not in gptq.METHODS:
        raise ValueError(f"quant.method={spec.method!r} is not one of {gptq.METHODS}")
    if spec.bits not in BITS:
        raise ValueError(f"quant.bits={spec.bits} is not supported; use 8 (W8A8) or 4")
    if spec.group_size < 0:
        raise ValueError(f"quant.group_size={spec.group_size} must be 0 (per output channel) "
                         "or a positive divisor of every linear's input width")
    if spec.activations not in ACTIVATIONS:
        raise ValueError(f"quant.activations={spec.activations!r} is not one of {ACTIVATIONS}")
    if spec.activations == "int8_dynamic" and (spec.bits != 8 or spec.group_size):
        raise ValueError("quant.activations=int8_dynamic is W8A8: it needs quant.bits=8 and "
                         f"quant.group_size=0 (got {spec.bits} and {spec.group_size})")
    smoothquant.check_alpha(spec.smoothquant_alpha)
    if spec.block_size < 1 or spec.dampening <= 0:
        raise ValueError(f"quant.block_size={spec.block_size} must be positive and "
                         f"quant.dampening={spec.dampening} positive (defaults 128, 0.01)")


def check_against_model(spec: QuantSpec, config: LlamaConfig) -> None:
    """The group size against every linear's input width, from the config alone."""
    widths = {"q/k/v and gate/up": config.hidden_size, "o_proj": config.q_width,
              "down_proj": config.intermediate_size}
    for what, width in widths.items():
        gptq.check_group_size(spec.group_size, width, what)
        if spec.group_size and spec.block_size % spec.group_size and (
                spec.group_size % spec.block_size):
            raise ValueError(f"quant.group_size={spec.group_size} must divide or be a multiple "
                             f"of quant.block_size={spec.block_size}")


def quantize_model(params: dict, config: LlamaConfig, windows: np.ndarray, spec: QuantSpec, *,
                   prune: driver.PruneSpec | None = None, masks: dict | None = None,
                   batch_size: int = 8, mesh: Mesh | None = None, rules=None,
                   progress: Callable | None = None) -> tuple[dict, dict, dict]:
    """Quantize every targeted linear (after pruning it, with `prune`); returns
    (params with dequantized float32 weights, masks, scales).

    masks: what is pruned already (default: the exact zeros of the weights): those entries
    stay exactly 0. scales: {'layers/self_attn/q_proj': (L, out) float32, ...}, the
    per-channel grids the weights lie on (empty with group_size > 0), for the W8A8 weights
    and the compressed-tensors export.
    """
    check_against_model(spec, config)
    masks = masks_from_zeros(params) if masks is None else masks
    if prune is None:
        prune = driver.PruneSpec(method=None, layer_sparsity=(0.0,) * config.num_layers,
                                 batch_size=batch_size)
    method = prune.method
    needs_gram = spec.method == "gptq" or (method is not None and method.stat is not None)
    per_layer_scales: dict[str, list] = {}

    def solve(block, name, w_in_out, stat, sparsity, mask_in_out):
        mask = mask_in_out
        if method is not None:  # the method's statistic from the Hessian (the one gathered)
            w_in_out, mask = driver.prune_linear(method, prune, w_in_out,
                                                 hessian.from_gram(method.stat, stat), sparsity,
                                                 mask_in_out)
        keep = None if mask.ndim == 0 else mask.T
        q = gptq.quantize_linear(spec.method, w_in_out.T, stat, bits=spec.bits,
                                 group_size=spec.group_size, act_order=spec.act_order,
                                 block_size=spec.block_size, dampening=spec.dampening,
                                 mask=keep)
        if not spec.group_size:
            per_layer_scales.setdefault(name, []).append(q.scale[:, 0])
        return q.weight.T.astype(jnp.float32), mask

    prepare = None
    if spec.smoothquant_alpha > 0:
        def prepare(block, p, stats):
            return smoothquant.smooth_block(p, stats(smoothquant.TAPS, "absmax"),
                                            spec.smoothquant_alpha)

    params = jax.tree.map(lambda w: jnp.asarray(w, jnp.float32), params)
    out, masks = driver.prune_model(
        params, config, windows, prune, masks=masks, mesh=mesh, rules=rules, progress=progress,
        linear_pass=driver.LinearPass(stat="gram" if needs_gram else None, solve=solve,
                                      prepare=prepare))
    scales = {f"layers/{name}": jnp.stack(s) for name, s in per_layer_scales.items()}
    return out, masks, scales
