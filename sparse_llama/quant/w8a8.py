"""The W8A8 forward: int8 weights with per-output-channel scales, dynamic per-token int8
activations, int32 accumulation (docs/quantization.md, "W8A8").

`Int8Weight` is a structured weight of `model/linear.py`'s protocol: a registered pytree whose
children are the int8 codes (..., in, out) and the float32 scales (..., out), so a stacked
(L, in, out) weight slices per layer (`llama.layer_params`, `lax.scan`) like a dense one. Its
`matmul(x)` is the jnp reference, on any backend:

    s_x = max_j |x_j| / 127 per token,  q_x = clip(round(x / s_x), -127, 127)   (int8)
    acc = q_x @ codes                                  (int32: preferred_element_type)
    y   = acc * s_x * scale                            (float32, then x's dtype)

Weights are symmetric per output channel: codes in [-127, 127], w = scale * code (a channel
whose weights are all zero gets scale 1), so a pruned weight is code 0 and stays exactly 0.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int8

from sparse_llama.ground.tree_paths import path_name
from sparse_llama.sparsity.masks import is_target

QMAX = 127  # symmetric int8: -127 .. 127 (no -128, so that negation is exact)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int8Weight:
    """A W8A8 linear weight stored (..., in, out): `codes` int8, `scale` float32 (..., out)."""

    # Arrays, or tuples of logical axis names in `logical_axes`' result (hence unannotated).
    codes: Any
    scale: Any

    format = "w8a8"

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)

    @property
    def nbytes(self) -> int:
        return int(self.codes.nbytes + self.scale.nbytes)

    def astype(self, dtype) -> "Int8Weight":
        """Codes and scales are kept: the output takes the compute dtype of x."""
        del dtype
        return self

    def matmul(self, x):
        return int8_matmul(x, self.codes, self.scale)

    def dequantize(self) -> jax.Array:
        """The float32 weight (..., in, out) the codes stand for."""
        return self.codes.astype(jnp.float32) * self.scale[..., None, :]

    def logical_axes(self, base: tuple[str, ...]) -> "Int8Weight":
        """Axis names of each array given the dense weight's (..., in, out) names: codes shard
        like the weight, scales like its output axis."""
        return Int8Weight(codes=tuple(base), scale=(*base[:-2], base[-1]))


def quantize_tokens(x: Float[Array, "*b i"]) -> tuple[Int8[Array, "*b i"], Float[Array, "*b 1"]]:
    """Dynamic symmetric per-token int8: (codes, scale) with x ~ codes * scale.

    An all-zero token gets scale 1 (codes 0), never a division by zero.
    """
    x32 = x.astype(jnp.float32)
    absmax = jnp.max(jnp.abs(x32), axis=-1, keepdims=True)
    scale = jnp.where(absmax > 0, absmax / QMAX, 1.0)
    codes = jnp.clip(jnp.round(x32 / scale), -QMAX, QMAX).astype(jnp.int8)
    return codes, scale


def int32_accumulate(qx: Int8[Array, "*b i"], codes: Int8[Array, "i o"]):
    """The integer part: sum_j qx_j * codes_jo, accumulated in int32."""
    return jax.lax.dot_general(qx, codes, (((qx.ndim - 1,), (0,)), ((), ())),
                               preferred_element_type=jnp.int32)


def int8_matmul(x: Float[Array, "*b i"], codes: Int8[Array, "i o"],
                scale: Float[Array, " o"]) -> Float[Array, "*b o"]:
    """x @ (codes * scale) with x quantized per token (module docstring); x's dtype out."""
    qx, sx = quantize_tokens(x)
    acc = int32_accumulate(qx, codes)
    return (acc.astype(jnp.float32) * sx * scale.astype(jnp.float32)).astype(x.dtype)


def channel_scales(w: Float[Array | np.ndarray, "*l i o"]) -> Float[Array, "*l o"]:
    """Round-to-nearest scales: max |w| over the inputs / 127 per output channel (1 if 0)."""
    absmax = jnp.max(jnp.abs(w.astype(jnp.float32)), axis=-2)
    return jnp.where(absmax > 0, absmax / QMAX, 1.0)


def from_float(w: Float[Array | np.ndarray, "*l i o"],
               scale: Float[Array | np.ndarray, "*l o"] | None = None) -> Int8Weight:
    """The Int8Weight of a float weight (..., in, out) on `scale` (default: round-to-nearest).

    With the scale GPTQ used, weights already on its grid (scale * integer, float32) get back
    exactly their codes.
    """
    scale = channel_scales(w) if scale is None else jnp.asarray(scale, jnp.float32)
    codes = jnp.round(w.astype(jnp.float32) / scale[..., None, :])
    return Int8Weight(codes=jnp.clip(codes, -QMAX, QMAX).astype(jnp.int8), scale=scale)


def quantize_params(params: dict, scales: dict | None = None) -> dict:
    """params with every targeted linear (q/k/v/o, gate/up/down) as an Int8Weight.

    scales: optional {path name ('layers/self_attn/q_proj'): (L, out) float32} from GPTQ;
    tensors without one get round-to-nearest scales.
    """
    scales = scales or {}

    def convert(path, w):
        name = path_name(path)
        if not is_target(name):
            return w
        if isinstance(w, Int8Weight):
            return w
        return from_float(w, scales.get(name))

    return jax.tree_util.tree_map_with_path(
        convert, params, is_leaf=lambda x: isinstance(x, Int8Weight))


def dequantize_params(params: dict) -> dict:
    """params with every Int8Weight replaced by its float32 weight."""
    return jax.tree.map(lambda w: w.dequantize() if isinstance(w, Int8Weight) else w, params,
                        is_leaf=lambda x: isinstance(x, Int8Weight))


def is_quantized(params: dict) -> bool:
    return any(isinstance(w, Int8Weight) for w in jax.tree.leaves(
        params, is_leaf=lambda x: isinstance(x, Int8Weight)))
