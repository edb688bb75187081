"""What every packed format implements, and the matmul they share (docs/kernels.md).

A format is one `Format` record (pack, unpack, its kernels) and one weight class on
`PackedWeight`. This module sits below the formats and imports none of them: a weight reaches
its own record through `packing`, so `PackedWeight.matmul` needs no registry.

Kernels: "gpu" (Pallas Triton), "tpu" (Pallas Mosaic), "reference" (pure jnp). By default
the backend picks: gpu -> "gpu", tpu -> "tpu", anything else (CPU) -> "reference".
`interpret=True` runs a Pallas kernel in interpret mode (on CPU: the GPU kernel unless
`kernel` says otherwise), which is how the tests check the kernels without an accelerator.

Backward: dx = g @ W^T through the packed weight (unpacked on the fly), and the weight's
cotangent holds the gradient at the kept entries only (the structure gets float0): a packed
weight trained through this op stays exactly as sparse as its mask.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

KERNELS = ("gpu", "tpu", "reference")
N_ALIGN = 128  # lane width: every format pads N to it, so a kernel's column block divides N


class Format(NamedTuple):
    """One packed format: what the registry (ops.py) and the shared matmul call."""

    name: str  # the `pack(w, format)` name, e.g. "bitmask"
    pack: Callable  # fn(w (..., K, N), *, mask=None) -> the packed weight
    unpack: Callable  # fn(packed) -> the dense (..., K, N) weight (pure jnp)
    unpack_mask: Callable  # fn(packed) -> the bool (..., K, N) mask
    values_cotangent: Callable  # fn(packed, dense grad (K, N)) -> the packed weight's cotangent
    kernels: dict  # kernel name (KERNELS) -> fn(x (M, K), packed, *, interpret) -> (M, N)


class PackedWeight:
    """Base of the packed weight types: the linear.py structured-weight protocol, shared.

    A subclass is a frozen dataclass registered as a pytree with the array fields `values`
    (the kept values, cast by `astype`) and its structure arrays, a static `shape` (K, N),
    `PACKED_AXES` and a `packing` property returning its module's `Format` record.
    """

    # Each array field -> the logical names of its axes between the lead axes and N.
    PACKED_AXES: ClassVar[dict[str, tuple[str, ...]]]

    @property
    def packing(self) -> Format:
        raise NotImplementedError(f"{type(self).__name__} names no Format record")

    @property
    def format(self) -> str:
        return self.packing.name

    @property
    def dtype(self):
        return self.values.dtype

    @property
    def nbytes(self) -> int:
        """Bytes of the packed arrays (padding included): what a matmul reads."""
        return int(sum(getattr(self, name).nbytes for name in self.PACKED_AXES))

    def astype(self, dtype):
        """The values cast to `dtype`, the structure kept."""
        return dataclasses.replace(self, values=self.values.astype(dtype))

    def matmul(self, x):
        return matmul(x, self)

    def logical_axes(self, base: tuple[str, ...]):
        """Axis names of each array given the dense weight's (..., in, out) names: the output
        axis keeps its name (column blocks shard like the dense weight); the packed axes
        (`PACKED_AXES`) replicate unless the mesh rules name them."""
        lead, out = tuple(base[:-2]), base[-1]
        return dataclasses.replace(self, **{name: (*lead, *axes, out)
                                            for name, axes in self.PACKED_AXES.items()})

    def cotangent(self, values):
        """This weight's cotangent with `values` at the values: the structure arrays get float0
        (they are not differentiable)."""
        structure = {name: np.zeros(getattr(self, name).shape, jax.dtypes.float0)
                     for name in self.PACKED_AXES if name != "values"}
        return dataclasses.replace(self, values=values, **structure)


def kept_mask(w: jax.Array, mask=None) -> jax.Array:
    """The bool mask a pack keeps: `mask`, or the nonzeros of w; a shape mismatch is an error."""
    mask = w != 0 if mask is None else jnp.asarray(mask, bool)
    if mask.shape != w.shape:
        raise ValueError(f"mask shape {mask.shape} differs from the weight's {w.shape}")
    return mask


def matmul_reference(x: Float[Array, "m k"], p: PackedWeight) -> Float[Array, "m n"]:
    """x @ unpack(p) in x's dtype (pure jnp): every format's "reference" kernel."""
    return jnp.dot(x, p.packing.unpack(p).astype(x.dtype))


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
    fn = p.packing.kernels[kernel]
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
    fmt = p.packing
    dx = jnp.dot(g, fmt.unpack(p).astype(g.dtype).T).astype(x.dtype)
    dw = jnp.dot(x.T, g, preferred_element_type=jnp.float32)
    return dx, fmt.values_cotangent(p, dw)


_matmul_2d.defvjp(_matmul_fwd, _matmul_bwd)


def matmul(x: Float[Array, "*b k"], p: PackedWeight, *, kernel: str | None = None,
           interpret: bool = False) -> Float[Array, "*b n"]:
    """x @ unpack(p) in x's dtype, by a Pallas kernel (GPU/TPU) or the reference (CPU)."""
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
