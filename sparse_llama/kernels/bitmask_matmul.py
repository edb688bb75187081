"""y = x @ W for a bitmask-packed W (layout: sparse_llama/kernels/bitmask.py): Pallas kernels
for GPU (Triton) and TPU (Mosaic) and their jitted wrappers. The pure-jnp reference is
`packed.matmul_reference`; bitmask.py (above this file) puts both in its `Format` record.

Both kernels expand one tile of W at a time from its bits and compacted values and feed it to
the matrix unit, so W is read from memory in its packed size (the point for memory-bound
decode). A tile is expanded bit plane by bit plane: plane b of the tile's bit rows covers R
contiguous rows of the tile, and a kept entry's value sits at its rank (the kept entries above
it in its tile column: a running count carried across the eight planes plus a scan inside
the plane: Triton's cumsum on GPU, a log-step scan of sublane rotations on TPU). Each plane's
(R, bn) slab is multiplied with the matching (bm, R) slice of x.

GPU: grid (M / bm, N / bn); each program loops over the K tiles (Triton programs run in
parallel, so the reduction stays inside one program); the values are gathered with pointer
loads at the computed ranks. TPU: grid (M / bm, N / bn, T) with the reduction last and an f32
VMEM accumulator; the gather is a take_along_axis in VMEM.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jaxtyping import Array, Float

from sparse_llama.kernels.packed import PackedWeight
from sparse_llama.kernels.pallas_calls import gpu_call, pad_rows, tpu_accumulate, tpu_call


def _tile_product(load_x, bits, gather, count_above, r: int, dtype):
    """One K tile's contribution (bm, bn) in f32: see the module docstring.
    `count_above(m)` is the exclusive running count of m (R, bn) down its columns."""
    bn = bits.shape[-1]
    acc = None
    offset = jnp.zeros((1, bn), jnp.int32)
    for b in range(8):
        m = (bits >> b) & 1
        rank = offset + count_above(m)
        w = jnp.where(m == 1, gather(rank), 0).astype(dtype)
        part = jnp.dot(load_x(b), w, preferred_element_type=jnp.float32)
        acc = part if acc is None else acc + part
        offset = offset + jnp.sum(m, axis=0, keepdims=True)
    return acc


def _count_above_cumsum(m):
    """Triton has a scan: cumsum minus self."""
    return jnp.cumsum(m, axis=0) - m


def _count_above_rolls(m):
    """Mosaic has no cumsum: a Hillis-Steele scan of log2(R) sublane rotations, each masked
    where it wrapped around (about 3 log2(R) vector ops per element, no matrix unit)."""
    r = m.shape[0]
    rows = jax.lax.broadcasted_iota(jnp.int32, m.shape, 0)
    total, shift = m, 1
    while shift < r:
        total = total + jnp.where(rows >= shift, pltpu.roll(total, shift, 0), 0)
        shift *= 2
    return total - m


def _gpu_kernel(x_ref, bits_ref, values_ref, o_ref, *, tiles: int, block_k: int, cap: int):
    r = block_k // 8
    bm, bn = o_ref.shape
    cols = jax.lax.broadcasted_iota(jnp.int32, (r, bn), 1)

    def body(t, acc):
        bits = bits_ref[pl.ds(t * r, r), :].astype(jnp.int32)

        def load_x(b):
            return x_ref[:, pl.ds(t * block_k + b * r, r)]

        def gather(rank):
            return values_ref[t * cap + jnp.minimum(rank, cap - 1), cols]

        return acc + _tile_product(load_x, bits, gather, _count_above_cumsum, r, x_ref.dtype)

    acc = jax.lax.fori_loop(0, tiles, body, jnp.zeros((bm, bn), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def _tpu_kernel(x_ref, bits_ref, values_ref, o_ref, acc_ref, *, block_k: int):
    r = block_k // 8
    cap = values_ref.shape[0]

    def load_x(b):
        return x_ref[:, b * r:(b + 1) * r]

    def gather(rank):
        return jnp.take_along_axis(values_ref[...], jnp.minimum(rank, cap - 1), axis=0)

    tpu_accumulate(o_ref, acc_ref, lambda: _tile_product(
        load_x, bits_ref[...].astype(jnp.int32), gather, _count_above_rolls, r, x_ref.dtype))


@functools.partial(jax.jit, static_argnames=("block_m", "block_n", "interpret"))
def bitmask_matmul_gpu(x: Float[Array, "m k"], p: PackedWeight, *, block_m: int = 16,
                       block_n: int = 128, interpret: bool = False) -> Float[Array, "m n"]:
    """The Triton kernel: x (M, K) @ W, any M (rows padded to block_m)."""
    t, cap, np_ = p.values.shape
    xp, mp = pad_rows(jnp.pad(x, ((0, 0), (0, t * p.block_k - x.shape[1]))), block_m)
    kernel = functools.partial(_gpu_kernel, tiles=t, block_k=p.block_k, cap=cap)
    out = gpu_call(
        kernel,
        in_specs=[pl.BlockSpec((block_m, t * p.block_k), lambda i, j: (i, 0)),
                  pl.BlockSpec((p.bits.shape[0], block_n), lambda i, j: (0, j)),
                  pl.BlockSpec((t * cap, block_n), lambda i, j: (0, j))],
        out_rows=mp, out_cols=np_, dtype=x.dtype, block_m=block_m, block_n=block_n,
        interpret=interpret, name="bitmask_matmul_gpu",
    )(xp, p.bits, p.values.reshape(t * cap, np_))
    return out[:x.shape[0], :p.shape[1]]


@functools.partial(jax.jit, static_argnames=("block_m", "block_n", "interpret"))
def bitmask_matmul_tpu(x: Float[Array, "m k"], p: PackedWeight, *, block_m: int = 16,
                       block_n: int = 128, interpret: bool = False) -> Float[Array, "m n"]:
    """The Mosaic kernel: x (M, K) @ W, any M (rows padded to block_m)."""
    t, cap, np_ = p.values.shape
    bk, r = p.block_k, p.block_k // 8
    xp, mp = pad_rows(jnp.pad(x, ((0, 0), (0, t * bk - x.shape[1]))), block_m)
    out = tpu_call(
        functools.partial(_tpu_kernel, block_k=bk), steps=t,
        in_specs=[pl.BlockSpec((block_m, bk), lambda i, j, k: (i, k)),
                  pl.BlockSpec((r, block_n), lambda i, j, k: (k, j)),
                  pl.BlockSpec((pl.squeezed, cap, block_n), lambda i, j, k: (k, 0, j))],
        out_rows=mp, out_cols=np_, dtype=x.dtype, block_m=block_m, block_n=block_n,
        interpret=interpret, name="bitmask_matmul_tpu",
    )(xp, p.bits, p.values)
    return out[:x.shape[0], :p.shape[1]]
