"""pack / unpack / matmul by format name: the registry of the packed formats.

Each format's module (bitmask.py, two_four.py) defines its weight class on
`packed.PackedWeight` and its `Format` record; `FORMATS` below is built from those records, so
a new format is one new module and one line in `FORMATS`. The shared custom-VJP matmul and
the choice of kernel by backend live in packed.py (below the formats); this module only
looks formats up and checks its arguments.
"""

from jaxtyping import Array, Float

from sparse_llama.kernels import bitmask, packed, two_four
from sparse_llama.kernels.packed import KERNELS, Format, PackedWeight, block_m_for, default_kernel

FORMATS: dict[str, Format] = {fmt.name: fmt for fmt in (
    bitmask.FORMAT,
    two_four.FORMAT,
)}
PACKED_TYPES = (PackedWeight,)

__all__ = ["FORMATS", "KERNELS", "PACKED_TYPES", "Format", "block_m_for", "default_kernel",
           "is_packed", "matmul", "pack", "unpack", "unpack_mask"]


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


def matmul(x: Float[Array, "*b k"], p, *, kernel: str | None = None,
           interpret: bool = False) -> Float[Array, "*b n"]:
    """x @ unpack(p) in x's dtype, by a Pallas kernel (GPU/TPU) or the reference (CPU)."""
    _format(p)  # a clear error for anything but a packed weight
    return packed.matmul(x, p, kernel=kernel, interpret=interpret)
