"""Per-row (per output channel) weight quantization grids for GPTQ and joint sparse+quant.

A grid maps a real w in row r to an integer code q = clip(round(w / scale_r) + zero_r,
qmin, qmax) and back to scale_r * (q - zero_r). Zero is always exactly representable (the
asymmetric range is widened to contain 0 and the zero point is an integer), so pruned weights
stay exact zeros after quantization.

- Asymmetric min-max (int4/int8; GPTQ's default): codes 0 .. 2^bits - 1, range
  [min(w_r, 0), max(w_r, 0)]; an all-zero row gets the range [-1, 1].
- Symmetric per channel (W8A8, `docs/algorithms.md`, "GPTQ"): codes -(2^(bits-1) - 1) ..
  2^(bits-1) - 1, scale = max|w_r| / (2^(bits-1) - 1), zero = 0; an all-zero row gets scale 1.
"""

from typing import NamedTuple

import jax.numpy as jnp
from jaxtyping import Array, Float, Int


class QuantGrid(NamedTuple):
    scale: Float[Array, "rows 1"]
    zero: Float[Array, "rows 1"]  # integer-valued zero point (0 for symmetric)
    qmin: Float[Array, ""]
    qmax: Float[Array, ""]


def minmax_grid(w: Float[Array, "rows cols"], bits: int, sym: bool = False) -> QuantGrid:
    """The per-row grid of `w` (rows = output channels in (out, in) orientation)."""
    if not 2 <= bits <= 16:
        raise ValueError(f"bits={bits}: pass an integer width in [2, 16] (e.g. 4 or 8)")
    w = w.astype(jnp.float32)
    if sym:
        qmax = float(2 ** (bits - 1) - 1)
        absmax = jnp.max(jnp.abs(w), axis=1, keepdims=True)
        scale = jnp.where(absmax == 0, 1.0, absmax / qmax)
        return QuantGrid(scale, jnp.zeros_like(scale), jnp.float32(-qmax), jnp.float32(qmax))
    qmax = float(2**bits - 1)
    lo = jnp.minimum(jnp.min(w, axis=1, keepdims=True), 0.0)
    hi = jnp.maximum(jnp.max(w, axis=1, keepdims=True), 0.0)
    empty = (lo == 0) & (hi == 0)
    lo, hi = jnp.where(empty, -1.0, lo), jnp.where(empty, 1.0, hi)
    scale = (hi - lo) / qmax
    zero = jnp.round(-lo / scale)
    return QuantGrid(scale, zero, jnp.float32(0.0), jnp.float32(qmax))


def quantize(w: Float[Array, "rows cols"], grid: QuantGrid) -> Int[Array, "rows cols"]:
    """Integer codes (int32) of w on the grid."""
    q = jnp.clip(jnp.round(w.astype(jnp.float32) / grid.scale) + grid.zero, grid.qmin, grid.qmax)
    return q.astype(jnp.int32)


def dequantize(q: Int[Array, "rows cols"], grid: QuantGrid) -> Float[Array, "rows cols"]:
    """float32 values of the codes."""
    return grid.scale * (q.astype(jnp.float32) - grid.zero)


def fake_quantize(w: Float[Array, "rows cols"], grid: QuantGrid) -> Float[Array, "rows cols"]:
    """Round w to the nearest grid value (float32): dequantize(quantize(w))."""
    q = jnp.clip(jnp.round(w.astype(jnp.float32) / grid.scale) + grid.zero, grid.qmin, grid.qmax)
    return grid.scale * (q - grid.zero)
