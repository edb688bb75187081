"""Sparsity-preserving GPTQ and round-to-nearest for one linear layer (docs/quantization.md,
"GPTQ").

GPTQ is `sparsegpt.quantize_layer`: the same Hessian, dampening, inverse factor and lazy block
updates as SparseGPT, with q = quantize(w) instead of a mask, and, on a sparse layer, the
error propagation multiplied by the mask, so a pruned weight is never touched and stays an
exact zero. This module adds act-order (columns in order of decreasing diag(H), GPTQ's
`desc_act`) around it, and gives both methods one result type. Layers are in Hugging Face
(out, in) orientation, as the solvers take them.
"""

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from sparse_llama.pruning import sparsegpt
from sparse_llama.pruning.quantize import QuantGrid, fake_quantize, minmax_grid

_ROW_ALIGN = 128


class QuantizedLinear(NamedTuple):
    """One quantized linear (out, in): `weight` = scale[:, g_idx] * (code - zero[:, g_idx])."""

    weight: Float[Array, "out in"]  # dequantized float32; exact zeros where pruned
    scale: Float[Array, "out g"]  # per output channel (g = 1) or per (channel, group)
    zero: Float[Array, "out g"]  # integer-valued zero points (0 when symmetric)
    g_idx: Int[Array, " in"]  # the group of every input column (all 0 without groups)


def check_group_size(group_size: int, width: int, what: str = "the layer") -> None:
    if group_size < 0 or (group_size and width % group_size):
        raise ValueError(f"quant.group_size={group_size} does not divide the {width} inputs of "
                         f"{what}; use 0 (one scale per output channel) or a divisor of "
                         f"{width}")


def codes(q: QuantizedLinear) -> Int[Array, "out in"]:
    """Integer codes of the dequantized weight: round(w / scale) + zero, entry by entry."""
    return jnp.round(q.weight / q.scale[:, q.g_idx] + q.zero[:, q.g_idx]).astype(jnp.int32)


def gptq_layer(weight: Float[Array | np.ndarray, "out in"],
               hessian: Float[Array | np.ndarray, "in in"], *, bits: int, sym: bool = True,
               group_size: int = 0, act_order: bool = False, block_size: int = 128,
               dampening: float = 0.01, mask: Bool[Array | np.ndarray, "out in"] | None = None
               ) -> QuantizedLinear:
    """GPTQ one layer; `mask` (True = kept) entries that are pruned stay exactly 0.

    act_order: quantize columns in order of decreasing diag(H) (groups are then runs of
    consecutive columns in that order, as GPTQ's `desc_act` without static groups).
    """
    check_group_size(group_size, weight.shape[1])
    w, h = jnp.asarray(weight, jnp.float32), jnp.asarray(hessian, jnp.float32)
    m = None if mask is None else jnp.asarray(mask)
    cols = w.shape[1]
    perm = inv = None
    if act_order:
        perm = jnp.argsort(-jnp.diagonal(h), stable=True)
        inv = jnp.argsort(perm)
        w, h = w[:, perm], h[perm][:, perm]
        m = None if m is None else m[:, perm]
    # Rows are independent in GPTQ: zero rows (their codes 0, no error) pad the outputs to a
    # multiple of 128, so that one compile of the sweep serves every width of a model
    # (q, k/v, gate/up read the same inputs), and real model widths need no padding.
    rows = w.shape[0]
    pad = -rows % _ROW_ALIGN
    if pad:
        w = jnp.pad(w, ((0, pad), (0, 0)))
        m = None if m is None else jnp.pad(m, ((0, pad), (0, 0)), constant_values=True)
    out, grid = sparsegpt.quantize_layer(w, h, bits=bits, sym=sym, block_size=block_size,
                                         dampening=dampening, mask=m, group_size=group_size)
    out, grid = out[:rows], grid._replace(scale=grid.scale[:rows], zero=grid.zero[:rows])
    groups = jnp.arange(cols) // group_size if group_size else jnp.zeros(cols, jnp.int32)
    if act_order:
        out, groups = out[:, inv], groups[inv]
    return QuantizedLinear(out, grid.scale, grid.zero, groups.astype(jnp.int32))


def rtn_layer(weight: Float[Array | np.ndarray, "out in"], *, bits: int, sym: bool = True,
              group_size: int = 0, mask: Bool[Array | np.ndarray, "out in"] | None = None
              ) -> QuantizedLinear:
    """Round-to-nearest on the same grids (the baseline); zeros stay exactly 0."""
    check_group_size(group_size, weight.shape[1])
    w = jnp.asarray(weight, jnp.float32)
    if mask is not None:
        w = jnp.where(jnp.asarray(mask), w, 0.0)
    rows, cols = w.shape
    g = group_size or cols
    grid = minmax_grid(jnp.transpose(w.reshape(rows, cols // g, g), (1, 0, 2)).reshape(-1, g),
                       bits, sym)
    scale = grid.scale.reshape(cols // g, rows).T
    zero = grid.zero.reshape(cols // g, rows).T
    groups = jnp.arange(cols, dtype=jnp.int32) // g
    per_entry = QuantGrid(scale[:, groups], zero[:, groups], grid.qmin, grid.qmax)
    return QuantizedLinear(fake_quantize(w, per_entry), scale, zero, groups)


METHODS = ("gptq", "rtn")


def quantize_linear(method: str, weight: Float[Array | np.ndarray, "out in"],
                    hessian: Float[Array | np.ndarray, "in in"] | None, *, bits: int,
                    group_size: int = 0, act_order: bool = False, block_size: int = 128,
                    dampening: float = 0.01,
                    mask: Bool[Array | np.ndarray, "out in"] | None = None) -> QuantizedLinear:
    """`method` ('gptq' | 'rtn') on one (out, in) layer, symmetric (docs/quantization.md)."""
    if method not in METHODS:
        raise ValueError(f"quant.method={method!r} is not one of {METHODS}")
    if method == "rtn":
        return rtn_layer(weight, bits=bits, group_size=group_size, mask=mask)
    return gptq_layer(weight, hessian, bits=bits, group_size=group_size, act_order=act_order,
                      block_size=block_size, dampening=dampening, mask=mask)
