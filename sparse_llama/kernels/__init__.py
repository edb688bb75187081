"""Packed sparse weights and the Pallas kernels that multiply by them (docs/kernels.md).

    pack(w, "bitmask" | "2:4")   w (..., in, out) -> a packed weight (a registered pytree)
    unpack(packed)               -> the dense weight
    matmul(x, packed)            == x @ unpack(packed)
"""

from sparse_llama.kernels.ops import FORMATS, is_packed, matmul, pack, unpack, unpack_mask

__all__ = ["FORMATS", "is_packed", "matmul", "pack", "unpack", "unpack_mask"]
