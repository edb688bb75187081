"""The bitmask format: a sparse (in, out) weight as packed bits and tile-compacted values.

Layout for a weight W (..., K, N) stored (in, out), with tile height `block_k` (bk) along the
reduction axis K. K is padded to a multiple of bk and N to a multiple of 128 (zeros, never
kept); T = K_pad / bk tiles, R = bk / 8 bit rows per tile.

    bits    uint8 (..., T * R, N_pad)   bit b of bits[t * R + r, n] is the mask of tile row
                                        b * R + r (so bit plane b is a contiguous slab of R
                                        rows: a kernel multiplies it with one slice of x)
    values  (..., T, cap, N_pad)        for each tile t and column n, the kept values of that
                                        tile column in row order, then zeros up to `cap` (the
                                        largest count over all tile columns; a multiple of 16)

A kernel loads one tile (R bit rows and a (cap, bn) value block) at a time and expands it
with a running count along the rows (the rank of a kept entry is the number of kept entries
above it in its tile column). The padding to `cap` costs bytes; `nbytes` reports the real
size (docs/kernels.md compares it with the ideal (1 - s) * 2 + 1/8 bytes per weight).

The compressed-tensors `sparse-bitmask` layout (docs/algorithms.md, "Compressed-tensors
layouts": Hugging Face (out, in) orientation, nonzeros row-major, bits packed little-endian per
row) is an import/export view:
`to_compressed_tensors` / `from_compressed_tensors`.

`FORMAT` (the end of this module) is the format's record for the registry (ops.py): these
pack / unpack functions and the kernels of bitmask_matmul.py.
"""

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from sparse_llama.kernels.bitmask_matmul import bitmask_matmul_gpu, bitmask_matmul_tpu
from sparse_llama.kernels.packed import N_ALIGN, Format, PackedWeight, kept_mask, matmul_reference

_BLOCK_K = 1024  # default tile height: a smaller spread of kept counts per tile column
_CAP_ALIGN = 16  # sublane packing of bf16: the value block stays tile-aligned


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BitmaskWeight(PackedWeight):
    """A packed (..., K, N) weight; the linear.py structured-weight protocol (PackedWeight)."""

    values: Any  # an array; Any: jax rebuilds pytrees with other leaves
    bits: Any  # an array; Any: jax rebuilds pytrees with other leaves
    shape: tuple[int, int] = dataclasses.field(metadata={"static": True})
    block_k: int = dataclasses.field(metadata={"static": True})

    PACKED_AXES = {"values": ("packed_tiles", "packed_cap"), "bits": ("packed_bits",)}

    @property
    def packing(self) -> Format:
        return FORMAT  # this module's record, at its end (it names the functions below)


def _padded(k: int, n: int, block_k: int) -> tuple[int, int]:
    return -(-k // block_k) * block_k, -(-n // N_ALIGN) * N_ALIGN


def _tile_ranks(mask: jax.Array) -> jax.Array:
    """Exclusive running count of kept entries down each tile column: (..., T, bk, N)."""
    m = mask.astype(jnp.int32)
    return jnp.cumsum(m, axis=-2) - m


def _mask_from_bits(bits: jax.Array, t: int, block_k: int) -> jax.Array:
    """bits (..., T*R, N) -> bool (..., T, bk, N) in tile row order b * R + r."""
    r = block_k // 8
    b = bits.reshape(*bits.shape[:-2], t, 1, r, bits.shape[-1]).astype(jnp.int32)
    planes = (b >> jnp.arange(8, dtype=jnp.int32)[:, None, None]) & 1  # (..., T, 8, R, N)
    return planes.reshape(*bits.shape[:-2], t, block_k, bits.shape[-1]).astype(bool)


def _tiles(a: jax.Array, block_k: int) -> jax.Array:
    """(..., K, N) -> (..., T, bk, N_pad), zero-padded."""
    *lead, k, n = a.shape
    kp, np_ = _padded(k, n, block_k)
    a = jnp.pad(a, [(0, 0)] * len(lead) + [(0, kp - k), (0, np_ - n)])
    return a.reshape(*lead, kp // block_k, block_k, np_)


@functools.partial(jax.jit, static_argnames="cap")
def _compact(w_t: jax.Array, m_t: jax.Array, cap: int) -> jax.Array:
    """Kept entries of each tile column moved to its top: (..., T, bk, N) -> (..., T, cap, N).
    Jittable for a static cap (the backward pass packs gradients with the forward's cap).
    Tiles are done a few at a time (lax.map), so a stacked 7B weight never needs full-size
    index arrays."""
    bk, np_ = w_t.shape[-2:]
    cols = jnp.broadcast_to(jnp.arange(np_), (bk, np_))

    def one(args):
        wt, mt = args
        ranks = jnp.where(mt, _tile_ranks(mt), cap)  # unkept entries go out of bounds: dropped
        return jnp.zeros((cap, np_), w_t.dtype).at[ranks, cols].set(wt, mode="drop")

    flat = jax.lax.map(one, (w_t.reshape(-1, bk, np_), m_t.reshape(-1, bk, np_)),
                       batch_size=8)
    return flat.reshape(*w_t.shape[:-2], cap, np_)


def pack_bitmask(w: Float[Array, "*l k n"], *, mask=None, block_k: int | None = None
                 ) -> BitmaskWeight:
    """Pack the kept entries of w (default: its nonzeros). Not jittable: `cap` is data-dependent.
    block_k: the tile height (default 1024, or K rounded up to 128 when that is smaller)."""
    if block_k is None:
        block_k = min(_BLOCK_K, -(-w.shape[-2] // 128) * 128)
    if block_k % 128:
        raise ValueError(f"block_k must be a multiple of 128 (kernel tile alignment), got "
                         f"{block_k}")
    w = jnp.asarray(w)
    mask = kept_mask(w, mask)
    count = int(_largest_count(mask, block_k))
    cap = max(_CAP_ALIGN, -(-count // _CAP_ALIGN) * _CAP_ALIGN)
    values, bits = _pack_arrays(w, mask, block_k, cap)
    return BitmaskWeight(values=values, bits=bits, shape=w.shape[-2:], block_k=block_k)


@functools.partial(jax.jit, static_argnames="block_k")
def _largest_count(mask: jax.Array, block_k: int) -> jax.Array:
    return jnp.max(jnp.sum(_tiles(mask, block_k), axis=-2), initial=0)


@functools.partial(jax.jit, static_argnames=("block_k", "cap"))
def _pack_arrays(w: jax.Array, mask: jax.Array, block_k: int, cap: int):
    m_t = _tiles(mask, block_k)
    return _compact(_tiles(w, block_k), m_t, cap), _bits(m_t)


def _bits(m_t: jax.Array) -> jax.Array:
    """(..., T, bk, N) bool -> (..., T * R, N) uint8 (layout: module docstring)."""
    *lead, t, bk, np_ = m_t.shape
    planes = m_t.reshape(*lead, t, 8, bk // 8, np_).astype(jnp.uint8)
    return jnp.sum(planes << jnp.arange(8, dtype=jnp.uint8)[:, None, None], axis=-3,
                   dtype=jnp.uint8).reshape(*lead, t * bk // 8, np_)


def unpack_bitmask(p: BitmaskWeight) -> Float[Array, "*l k n"]:
    """The dense (..., K, N) weight (pure jnp: the reference the kernels are checked against)."""
    *lead, t, cap, np_ = p.values.shape
    mask = _mask_from_bits(p.bits, t, p.block_k)
    ranks = jnp.minimum(_tile_ranks(mask), cap - 1)
    dense = jnp.where(mask, jnp.take_along_axis(p.values, ranks, axis=-2), 0)
    k, n = p.shape
    return dense.reshape(*lead, t * p.block_k, np_)[..., :k, :n]


def to_compressed_tensors(p: BitmaskWeight) -> dict[str, np.ndarray]:
    """The compressed-tensors `sparse-bitmask` tensors of one 2-D weight, in the Hugging Face
    (out, in) orientation: `compressed` (nonzeros row-major), `bitmask` (uint8, little-endian
    bits, rows x ceil(cols / 8)), `shape` and `row_offsets` (start of each row in compressed)."""
    if p.values.ndim != 3:
        raise ValueError("to_compressed_tensors takes one 2-D weight; index the layer first")
    w_oi = np.asarray(unpack_bitmask(p)).T
    mask = np.asarray(_mask_from_bits(p.bits, p.values.shape[0], p.block_k)).reshape(
        -1, p.values.shape[-1])[:p.shape[0], :p.shape[1]].T
    counts = mask.sum(axis=1)
    return {"compressed": w_oi[mask], "bitmask": np.packbits(mask, axis=1, bitorder="little"),
            "shape": np.asarray(w_oi.shape, np.int64),
            "row_offsets": np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)}


def from_compressed_tensors(tensors: dict[str, np.ndarray], *, block_k: int | None = None
                            ) -> BitmaskWeight:
    """Inverse of `to_compressed_tensors`: the packed (in, out) weight."""
    rows, cols = (int(d) for d in tensors["shape"])
    mask = np.unpackbits(np.asarray(tensors["bitmask"], np.uint8), axis=1, count=cols,
                         bitorder="little").astype(bool)
    if mask.shape != (rows, cols) or mask.sum() != tensors["compressed"].size:
        raise ValueError(f"bitmask {mask.shape} with {mask.sum()} set bits does not match shape "
                         f"{(rows, cols)} and {tensors['compressed'].size} compressed values")
    w_oi = np.zeros((rows, cols), tensors["compressed"].dtype)
    w_oi[mask] = tensors["compressed"]
    return pack_bitmask(jnp.asarray(w_oi.T), mask=jnp.asarray(mask.T), block_k=block_k)


def dense_bytes_ratio(p: BitmaskWeight) -> float:
    """Dense bytes (same dtype) over packed bytes: the memory-bound speedup this pack allows."""
    lead = math.prod(p.values.shape[:-3])
    return lead * p.shape[0] * p.shape[1] * p.values.dtype.itemsize / p.nbytes


def values_cotangent(p: BitmaskWeight, grad: Float[Array, "k n"]) -> BitmaskWeight:
    """The cotangent of the packed weight given the dense weight gradient: the gradient at the
    kept entries in the values layout; the bits are structure (float0 cotangent)."""
    mask = unpack_mask(p)
    values = _compact(_tiles(grad.astype(p.values.dtype), p.block_k), _tiles(mask, p.block_k),
                      p.values.shape[-2])
    return p.cotangent(values)


def unpack_mask(p: BitmaskWeight) -> jax.Array:
    """The bool (..., K, N) mask."""
    *lead, t, _, np_ = p.values.shape
    k, n = p.shape
    return _mask_from_bits(p.bits, t, p.block_k).reshape(*lead, t * p.block_k, np_)[..., :k, :n]


FORMAT = Format(name="bitmask", pack=pack_bitmask, unpack=unpack_bitmask, unpack_mask=unpack_mask,
                values_cotangent=values_cotangent,
                kernels={"gpu": bitmask_matmul_gpu, "tpu": bitmask_matmul_tpu,
                         "reference": matmul_reference})
