"""The 2:4 format: at most two kept weights in every group of four consecutive inputs.

For a weight W (..., K, N) stored (in, out) (groups run along the reduction axis K, as the
pruning masks have them), G = K / 4 groups, padded to a multiple of `2 * block_g` and N to a
multiple of 128:

    values  (..., 2, G_pad, N_pad)   values[0] / values[1]: the first / second kept weight of
                                     each group (rows x cols/2 values in all)
    meta    uint8 (..., G_pad / 2, N_pad)
                                     per group a 4-bit code i0 | i1 << 2 (the in-group
                                     positions of the values); group h sits in the low
                                     nibble of meta[h], group h + G_pad / 2 in the high
                                     nibble: 2 bits per kept weight

The codes are the mask, whatever the values (a kept weight may be exactly zero: a GPTQ code
rounded to 0): i0 < i1 keeps both positions; i0 == i1 keeps that one position (values[1] is
zero); i0 > i1 (code 1, padding included) keeps none (both values zero).

Splitting the groups in two halves (instead of packing neighbours) lets a kernel read the two
nibbles of one meta tile as two contiguous group ranges: no interleaving in the kernel. A
kernel contracts x[:, 4g + j] with the plane W_j[g] = (i0 == j) v0 + (i1 == j) v1, so x is
read as four strided planes (`two_four_matmul.x_planes`).

`FORMAT` (the end of this module) is the format's record for the registry (ops.py): these
pack / unpack functions and the kernels of two_four_matmul.py.
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from sparse_llama.kernels.packed import N_ALIGN, Format, PackedWeight, kept_mask, matmul_reference
from sparse_llama.kernels.two_four_matmul import two_four_matmul_gpu, two_four_matmul_tpu


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TwoFourWeight(PackedWeight):
    """A packed 2:4 (..., K, N) weight; the linear.py structured-weight protocol (PackedWeight)."""

    values: Any  # an array; Any: jax rebuilds pytrees with other leaves
    meta: Any  # an array; Any: jax rebuilds pytrees with other leaves
    shape: tuple[int, int] = dataclasses.field(metadata={"static": True})
    block_g: int = dataclasses.field(metadata={"static": True})

    PACKED_AXES = {"values": ("packed_planes", "packed_groups"), "meta": ("packed_groups",)}

    @property
    def packing(self) -> Format:
        return FORMAT  # this module's record, at its end (it names the functions below)


@functools.partial(jax.jit, static_argnames="block_g")
def _groups(a: jax.Array, block_g: int) -> jax.Array:
    """(..., K, N) -> (..., G_pad, 4, N_pad), zero-padded."""
    *lead, k, n = a.shape
    g = k // 4
    gp = -(-g // (2 * block_g)) * 2 * block_g
    np_ = -(-n // N_ALIGN) * N_ALIGN
    a = a.reshape(*lead, g, 4, n)
    return jnp.pad(a, [(0, 0)] * len(lead) + [(0, gp - g), (0, 0), (0, np_ - n)])


def _positions(kept: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The codes (i0, i1) of each group's kept entries (the module docstring): two kept ->
    their positions, i0 < i1; one kept at j -> (j, j); none -> (1, 0)."""
    order = jnp.argsort(jnp.where(kept, 0, 4) + jnp.arange(4)[:, None], axis=-2, stable=True)
    first, second = order[..., 0, :], order[..., 1, :]
    count = jnp.sum(kept, axis=-2)
    return (jnp.where(count > 0, first, 1),
            jnp.where(count > 1, second, jnp.where(count > 0, first, 0)))


def _planes_kept(i0: jax.Array, i1: jax.Array) -> jax.Array:
    """bool (..., 2, G, N): whether values[0] / values[1] hold a kept weight."""
    return jnp.stack([i0 <= i1, i0 < i1], axis=-3)


def pack_two_four(w: Float[Array, "*l k n"], *, mask=None, block_g: int = 128) -> TwoFourWeight:
    """Pack a 2:4 weight (default mask: its nonzeros). A weight that is not 2:4 is an error."""
    w = jnp.asarray(w)
    k = w.shape[-2]
    if k % 4:
        raise ValueError(f"a 2:4 pack needs the input dim to be a multiple of 4, got {k}")
    if block_g % 32:
        raise ValueError(f"block_g must be a multiple of 32 (uint8 tile rows), got {block_g}")
    mask = kept_mask(w, mask)
    values, meta, over = _pack_arrays(w, mask, block_g)
    if int(over):
        raise ValueError(f"weight is not 2:4: {int(over)} groups of four inputs keep more than "
                         "two entries; prune it with the 2:4 pattern (groups along the in axis) "
                         "or pack it as 'bitmask'")
    return TwoFourWeight(values=values, meta=meta, shape=w.shape[-2:], block_g=block_g)


@functools.partial(jax.jit, static_argnames="block_g")
def _pack_arrays(w: jax.Array, mask: jax.Array, block_g: int):
    """(values, meta, number of groups keeping more than two entries)."""
    kept = _groups(mask, block_g)
    over = jnp.sum(jnp.sum(kept, axis=-2) > 2)
    values, meta = _pack_groups(_groups(jnp.where(mask, w, 0), block_g), kept)
    return values, meta, over


def _pack_groups(wg: jax.Array, kept: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Grouped weight and mask (..., G, 4, N) -> (values, meta) (layout: module docstring),
    one leading index (layer) at a time."""
    def one(args):
        w, k = args
        i0, i1 = _positions(k)
        values = jnp.stack([jnp.take_along_axis(w, i[:, None, :], axis=1)[:, 0, :]
                            for i in (i0, i1)], axis=0)
        values = jnp.where(_planes_kept(i0, i1), values, jnp.zeros((), values.dtype))
        code = (i0 | (i1 << 2)).astype(jnp.uint8)
        half = code.shape[0] // 2
        return values, code[:half] | (code[half:] << 4)

    lead = wg.shape[:-3]
    values, meta = jax.lax.map(one, (wg.reshape(-1, *wg.shape[-3:]),
                                     kept.reshape(-1, *kept.shape[-3:])))
    return (values.reshape(*lead, *values.shape[1:]), meta.reshape(*lead, *meta.shape[1:]))


def _codes(p: TwoFourWeight) -> tuple[jax.Array, jax.Array]:
    """(i0, i1), each int32 (..., G_pad, N_pad)."""
    m = p.meta.astype(jnp.int32)
    code = jnp.concatenate([m & 15, m >> 4], axis=-2)
    return code & 3, code >> 2


def _dense_groups(values: jax.Array, i0: jax.Array, i1: jax.Array) -> jax.Array:
    """(..., G, 4, N): the planes W_j put back into their groups (the values off the mask are
    zero, or False for a mask)."""
    j = jnp.arange(4)[:, None]
    kept = _planes_kept(i0, i1)
    zero = jnp.zeros((), values.dtype)
    v0 = jnp.where(kept[..., 0, :, :], values[..., 0, :, :], zero)[..., None, :]
    v1 = jnp.where(kept[..., 1, :, :], values[..., 1, :, :], zero)[..., None, :]
    return (jnp.where(i0[..., None, :] == j, v0, zero)
            + jnp.where(i1[..., None, :] == j, v1, zero))


def _scatter(values: jax.Array, p: TwoFourWeight) -> jax.Array:
    """values laid out like p.values, put back at their (K, N) positions (those off the
    mask dropped)."""
    i0, i1 = _codes(p)
    dense = _dense_groups(values, i0, i1)
    *lead, gp, _, np_ = dense.shape
    k, n = p.shape
    return dense.reshape(*lead, gp * 4, np_)[..., :k, :n]


def unpack_two_four(p: TwoFourWeight) -> Float[Array, "*l k n"]:
    """The dense (..., K, N) weight (pure jnp reference)."""
    return _scatter(p.values, p)


def unpack_mask(p: TwoFourWeight) -> jax.Array:
    """The bool (..., K, N) mask: the positions the codes name (a kept zero stays kept)."""
    return _scatter(jnp.ones(p.values.shape, bool), p)


def values_cotangent(p: TwoFourWeight, grad: Float[Array, "k n"]) -> TwoFourWeight:
    """The cotangent of the packed weight given the dense gradient: the gradient at the kept
    positions (those the codes name, zero or not); a value slot that holds no kept weight
    gets none, so training keeps the mask. The metadata is structure (float0 cotangent)."""
    i0, i1 = _codes(p)
    g = _groups(grad.astype(p.values.dtype), p.block_g)
    values = jnp.stack([jnp.take_along_axis(g, i[..., None, :], axis=-2)[..., 0, :]
                        for i in (i0, i1)], axis=-3)
    values = jnp.where(_planes_kept(i0, i1), values, jnp.zeros((), values.dtype))
    return p.cotangent(values)


FORMAT = Format(name="2:4", pack=pack_two_four, unpack=unpack_two_four, unpack_mask=unpack_mask,
                values_cotangent=values_cotangent,
                kernels={"gpu": two_four_matmul_gpu, "tpu": two_four_matmul_tpu,
                         "reference": matmul_reference})
