"""y = x @ W for a 2:4-packed W (layout: sparse_llama/kernels/two_four.py): Pallas kernels for
GPU (Triton) and TPU (Mosaic) and their jitted wrappers. The pure-jnp reference is
`packed.matmul_reference`; two_four.py (above this file) puts both in its `Format` record.

With x read as four planes x_j[:, g] = x[:, 4g + j] (`x_planes`), x @ W is
sum_j x_j @ W_j where W_j[g] = (i0 == j) v0[g] + (i1 == j) v1[g]: four dense products per
group tile, built from the two value planes and the 2-bit codes with selects only (no gather,
no interleave), so W is read in its packed size. A meta tile (bg, bn) holds the codes of two
group ranges (low nibble: groups of the first half, high nibble: the second half), so each
K step handles the group tile k of both halves.

GPU: grid (M / bm, N / bn), the K loop inside the program. TPU: grid (M / bm, N / bn, K steps)
with an f32 VMEM accumulator.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jaxtyping import Array, Float

from sparse_llama.kernels.packed import PackedWeight
from sparse_llama.kernels.pallas_calls import gpu_call, pad_rows, tpu_accumulate, tpu_call


def x_planes(x: Float[Array, "m k"], g_pad: int) -> Float[Array, "4 m gp"]:
    """x[:, 4g + j] as plane j (zero-padded to g_pad groups): what the kernels contract."""
    m, k = x.shape
    planes = jnp.transpose(x.reshape(m, k // 4, 4), (2, 0, 1))
    return jnp.pad(planes, ((0, 0), (0, 0), (0, g_pad - k // 4)))


def _tile_product(load_x, load_v, meta, dtype):
    """Contribution (bm, bn) f32 of one meta tile: `load_x(half, j)` (bm, bg) and
    `load_v(half, plane)` (bg, bn) read the two group ranges the tile's nibbles describe."""
    acc = None
    for half, code in ((0, meta & 15), (1, meta >> 4)):
        i0, i1 = code & 3, code >> 2
        v0, v1 = load_v(half, 0), load_v(half, 1)
        zero = jnp.zeros((), v0.dtype)
        for j in range(4):
            w = (jnp.where(i0 == j, v0, zero) + jnp.where(i1 == j, v1, zero)).astype(dtype)
            part = jnp.dot(load_x(half, j), w, preferred_element_type=jnp.float32)
            acc = part if acc is None else acc + part
    return acc


def _gpu_kernel(x_ref, v_ref, meta_ref, o_ref, *, steps: int, block_g: int):
    half_groups = steps * block_g
    bm, bn = o_ref.shape

    def body(k, acc):
        def start(half):
            return half * half_groups + k * block_g

        def load_x(half, j):
            return x_ref[j, :, pl.ds(start(half), block_g)]

        def load_v(half, plane):
            return v_ref[plane, pl.ds(start(half), block_g), :]

        meta = meta_ref[pl.ds(k * block_g, block_g), :].astype(jnp.int32)
        return acc + _tile_product(load_x, load_v, meta, x_ref.dtype)

    acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((bm, bn), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def _tpu_kernel(x_lo, x_hi, v_lo, v_hi, meta_ref, o_ref, acc_ref):
    xs, vs = (x_lo, x_hi), (v_lo, v_hi)
    tpu_accumulate(o_ref, acc_ref, lambda: _tile_product(
        lambda h, j: xs[h][j], lambda h, c: vs[h][c], meta_ref[...].astype(jnp.int32),
        x_lo.dtype))


def _planes(x, p: PackedWeight, block_m: int):
    xp, mp = pad_rows(x, block_m)
    return x_planes(xp, p.values.shape[-2]), mp


@functools.partial(jax.jit, static_argnames=("block_m", "block_n", "interpret"))
def two_four_matmul_gpu(x: Float[Array, "m k"], p: PackedWeight, *, block_m: int = 16,
                        block_n: int = 128, interpret: bool = False) -> Float[Array, "m n"]:
    """The Triton kernel: x (M, K) @ W, any M (rows padded to block_m)."""
    _, gp, np_ = p.values.shape
    bg = p.block_g
    planes, mp = _planes(x, p, block_m)
    out = gpu_call(
        functools.partial(_gpu_kernel, steps=gp // 2 // bg, block_g=bg),
        in_specs=[pl.BlockSpec((4, block_m, gp), lambda i, j: (0, i, 0)),
                  pl.BlockSpec((2, gp, block_n), lambda i, j: (0, 0, j)),
                  pl.BlockSpec((gp // 2, block_n), lambda i, j: (0, j))],
        out_rows=mp, out_cols=np_, dtype=x.dtype, block_m=block_m, block_n=block_n,
        interpret=interpret, name="two_four_matmul_gpu",
    )(planes, p.values, p.meta)
    return out[:x.shape[0], :p.shape[1]]


@functools.partial(jax.jit, static_argnames=("block_m", "block_n", "interpret"))
def two_four_matmul_tpu(x: Float[Array, "m k"], p: PackedWeight, *, block_m: int = 16,
                        block_n: int = 128, interpret: bool = False) -> Float[Array, "m n"]:
    """The Mosaic kernel: x (M, K) @ W, any M (rows padded to block_m)."""
    _, gp, np_ = p.values.shape
    bg = p.block_g
    steps = gp // 2 // bg
    planes, mp = _planes(x, p, block_m)
    x_spec = [pl.BlockSpec((4, block_m, bg), lambda i, j, k, h=h: (0, i, k + h * steps))
              for h in (0, 1)]
    v_spec = [pl.BlockSpec((2, bg, block_n), lambda i, j, k, h=h: (0, k + h * steps, j))
              for h in (0, 1)]
    out = tpu_call(
        _tpu_kernel, steps=steps,
        in_specs=[*x_spec, *v_spec, pl.BlockSpec((bg, block_n), lambda i, j, k: (k, j))],
        out_rows=mp, out_cols=np_, dtype=x.dtype, block_m=block_m, block_n=block_n,
        interpret=interpret, name="two_four_matmul_tpu",
    )(planes, planes, p.values, p.values, p.meta)
    return out[:x.shape[0], :p.shape[1]]
