"""pack / unpack / matmul over the packed formats: the format registry, the choice of kernel
by backend, and the custom VJP that lets training run through a packed weight.

Kernels: "gpu" (Pallas Triton), "tpu" (Pallas Mosaic), "reference" (pure jnp). By default
the backend picks: gpu -> "gpu", tpu -> "tpu", anything else (CPU) -> "reference".
`interpret=True` runs a Pallas kernel in interpret mode (on CPU: the GPU kernel unless
`kernel` says otherwise), which is how the tests check the kernels without an accelerator.

Backward: dx = g @ W^T through the packed weight (unpacked on the fly), and the weight's
cotangent holds the gradient at the kept entries only (the structure gets float0): a packed
weight trained through this op stays exactly as sparse as its mask.
"""

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from sparse_llama.kernels import bitmask, bitmask_matmul, two_four, two_four_matmul


class Format(NamedTuple):
    pack: Callable
    unpack: Callable
    unpack_mask: Callable
    values_cotangent: Callable
    kernels: dict  # kernel name -> fn(x (M, K), packed, *, interpret) -> (M, N)


FORMATS = {
    "bitmask": Format(bitmask.pack_bitmask, bitmask.unpack_bitmask, bitmask.unpack_mask,
                      bitmask.values_cotangent,
                      {"gpu": bitmask_matmul.bitmask_matmul_gpu,
                       "tpu": bitmask_matmul.bitmask_matmul_tpu,
                       "reference": bitmask_matmul.bitmask_matmul_reference}),
    "2:4": Format(two_four.pack_two_four, two_four.unpack_two_four, two_four.unpack_mask,
                  two_four.values_cotangent,
                  {"gpu": two_four_matmul.two_four_matmul_gpu,
                   "tpu": two_four_matmul.two_four_matmul_tpu,
                   "reference": two_four_matmul.two_four_matmul_reference}),
}
PACKED_TYPES = (bitmask.BitmaskWeight, two_four.TwoFourWeight)
KERNELS = ("gpu", "tpu", "reference")


def is_packed(w) -> bool:
    return isinstance(w, PACKED_TYPES)


def pack(w: Float[Array, "*l k n"], format: str, *, mask=None):
    """Pack a (..., in, out) weight (default mask: its nonzeros) as `format`."""
    if format not in FORMATS:
        raise ValueError(f"unknown packed format {format!r}; use one of {sorted(FORMATS)}")
    return FORMATS[format].pack(w, mask=mask)


def _format(p) -> Format:
    if not is_packed(p):
        raise TypeError(f"expected a packed weight (sparse_llama.kernels.pack), got "
                        f"{type(p).__name__}")
    return FORMATS[p.format]


def unpack(p) -> Array:
    """The dense (..., in, out) weight."""
    return _format(p).unpack(p)


def unpack_mask(p) -> Array:
    return _format(p).unpack_mask(p)


def default_kernel(interpret: bool = False) -> str:
    backend = jax.default_backend()
    if backend in ("gpu", "cuda", "rocm"):
        return "gpu"
    if backend == "tpu":
        return "tpu"
    return "gpu" if interpret else "reference"


def block_m_for(rows: int) -> int:
    """Row tile: 16 (the smallest matrix-unit tile) for decode, up to 128 for prefill, so that
    W is re-read once per 128 rows and not once per 16."""
    return 16 if rows <= 16 else 64 if rows <= 64 else 128


def _run(x, p, kernel: str, interpret: bool):
    fn = FORMATS[p.format].kernels[kernel]
    if kernel == "reference":
        return fn(x, p)
    return fn(x, p, block_m=block_m_for(x.shape[0]), interpret=interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _matmul_2d(x, p, kernel, interpret):
    return _run(x, p, kernel, interpret)


def _matmul_fwd(x, p, kernel, interpret):
    return _run(x, p, kernel, interpret), (x, p)


def _matmul_bwd(kernel, interpret, res, g):
    del kernel, interpret
    x, p = res
    fmt = FORMATS[p.format]
    dx = jnp.dot(g, fmt.unpack(p).astype(g.dtype).T).astype(x.dtype)
    dw = jnp.dot(x.T, g, preferred_element_type=jnp.float32)
    return dx, fmt.values_cotangent(p, dw)


_matmul_2d.defvjp(_matmul_fwd, _matmul_bwd)


def matmul(x: Float[Array, "*b k"], p, *, kernel: str | None = None,
           interpret: bool = False) -> Float[Array, "*b n"]:
    """x @ unpack(p) in x's dtype, by a Pallas kernel (GPU/TPU) or the reference (CPU)."""
    _format(p)  # a clear error for anything but a packed weight
    if p.values.ndim != 3:
        raise ValueError(f"matmul takes one 2-D packed weight, got stacked values "
                         f"{p.values.shape}; index the layer axis first")
    k, n = p.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features but the packed weight takes {k}")
    kernel = kernel or default_kernel(interpret)
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; use one of {KERNELS}")
    y = _matmul_2d(x.reshape(-1, k), p.astype(x.dtype), kernel, interpret)
    return y.reshape(*x.shape[:-1], n)
