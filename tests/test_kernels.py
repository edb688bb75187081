"""Packed sparse formats and the Pallas matmul kernels (interpret mode on CPU).

References: float64 numpy products for the forward, jax autodiff through the pure-jnp unpack
for the VJP, numpy transcriptions of the bit layouts (compressed-tensors included).
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from sparse_llama import kernels
from sparse_llama.kernels import bitmask, bitmask_matmul, packed, two_four, two_four_matmul

# Partial tiles everywhere: M=20 rows over 16-row tiles, N=130 columns over 128, and K not a
# multiple of the K tile (bitmask: 200 rows over 128-row tiles; 2:4: 70 groups over 32).
M, N = 20, 130
K = {"bitmask": 200, "2:4": 280}
BLOCKS = {"bitmask": {"block_k": 128}, "2:4": {"block_g": 32}}
PACK = {"bitmask": bitmask.pack_bitmask, "2:4": two_four.pack_two_four}
KERNEL = {("bitmask", "gpu"): bitmask_matmul.bitmask_matmul_gpu,
          ("bitmask", "tpu"): bitmask_matmul.bitmask_matmul_tpu,
          ("2:4", "gpu"): two_four_matmul.two_four_matmul_gpu,
          ("2:4", "tpu"): two_four_matmul.two_four_matmul_tpu}


def sparse_weight(fmt: str, shape, seed: int = 0, density: float = 0.4) -> np.ndarray:
    """A random weight (..., K, N): 2:4 along K (some groups keep fewer than two), or
    unstructured at `density` with one all-zero and one all-kept tile column."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=shape).astype(np.float32)
    if fmt == "2:4":
        g = w.reshape(*shape[:-2], shape[-2] // 4, 4, shape[-1])
        rank = np.argsort(np.argsort(rng.random(g.shape), axis=-2), axis=-2)
        g[rank >= 2] = 0
        g[..., 0, :, 0] = 0  # a group with nothing kept
        g[..., 1, :, 1] = [1.5, 0, 0, 0]  # a group with one kept entry
        return g.reshape(shape)
    w[rng.random(shape) > density] = 0
    w[..., :, 2] = 0
    w[..., :128, 3] = rng.normal(size=w[..., :128, 3].shape)
    return w


def pack(fmt, w):
    return PACK[fmt](jnp.asarray(w), **BLOCKS[fmt])


@pytest.mark.parametrize("fmt,dtype", [("bitmask", jnp.bfloat16), ("2:4", jnp.float32)])
def test_pack_unpack_round_trip_is_exact(fmt, dtype):
    w = jnp.asarray(sparse_weight(fmt, (3, K[fmt], N)), dtype)  # stacked like the layers axis
    p = pack(fmt, w)
    assert p.values.dtype == dtype and p.shape == (K[fmt], N)
    np.testing.assert_array_equal(np.asarray(kernels.unpack(p)), np.asarray(w))
    np.testing.assert_array_equal(np.asarray(kernels.unpack_mask(p)), np.asarray(w) != 0)
    one = jax.tree.map(lambda a: a[1], p)  # a layer slice of the stacked pack is a pack
    np.testing.assert_array_equal(np.asarray(kernels.unpack(one)), np.asarray(w[1]))


@pytest.mark.parametrize("fmt", list(K))
def test_a_kept_zero_stays_kept_in_the_mask_and_the_vjp(fmt):
    """A kept weight that is exactly zero (a GPTQ code rounded to 0, a zero-initialised
    weight) is part of the mask: unpack_mask returns the given mask, not the nonzeros, and
    the weight cotangent reaches it; unkept positions get none."""
    w = sparse_weight(fmt, (K[fmt], N), seed=11)
    mask = w != 0
    mask[4:8, 1], w[4:8, 1] = [True, False, False, False], 0  # a group keeping one zero
    w[mask & (np.arange(K[fmt])[:, None] % 3 == 0)] = 0  # groups keeping one or two zeros
    assert (mask & (w == 0)).sum() > 1000 and not mask[:4, 0].any()  # and one keeping none
    p = PACK[fmt](jnp.asarray(w), mask=jnp.asarray(mask), **BLOCKS[fmt])
    np.testing.assert_array_equal(np.asarray(kernels.unpack_mask(p)), mask)
    np.testing.assert_array_equal(np.asarray(kernels.unpack(p)), w)
    x = jnp.asarray(np.random.default_rng(12).normal(size=(3, K[fmt])), jnp.float32)
    gp = jax.grad(lambda p: jnp.sum(kernels.matmul(x, p)), allow_int=True)(p)
    dense_grad = np.asarray(kernels.unpack(dataclasses.replace(p, values=gp.values)))
    want = np.asarray(x).T @ np.ones((3, N), np.float32)  # d sum(x @ W) / dW
    np.testing.assert_allclose(dense_grad, np.where(mask, want, 0), rtol=1e-5, atol=1e-5)


def test_bitmask_layout_is_the_documented_one():
    w = sparse_weight("bitmask", (K["bitmask"], N))
    p = pack("bitmask", w)
    bk, r = 128, 16
    bits, values = np.asarray(p.bits), np.asarray(p.values)
    wp = np.zeros((256, 256), np.float32)
    wp[:w.shape[0], :w.shape[1]] = w
    for t in range(2):
        for n in (0, 3, 77, 129):
            col = wp[t * bk:(t + 1) * bk, n]
            for row in range(bk):
                b, rr = divmod(row, r)
                assert (bits[t * r + rr, n] >> b) & 1 == (col[row] != 0)
            kept = col[col != 0]
            np.testing.assert_array_equal(values[t, :kept.size, n], kept)
            assert not values[t, kept.size:, n].any()
    assert values.shape[1] % 16 == 0 and values.shape[1] >= (wp != 0).reshape(2, bk, -1).sum(1).max()


def test_compressed_tensors_view_round_trips():
    w = sparse_weight("bitmask", (K["bitmask"], N), seed=3)
    view = bitmask.to_compressed_tensors(pack("bitmask", w))
    w_oi = w.T  # Hugging Face (out, in)
    np.testing.assert_array_equal(view["compressed"], w_oi[w_oi != 0])
    np.testing.assert_array_equal(view["bitmask"],
                                  np.packbits(w_oi != 0, axis=1, bitorder="little"))
    assert view["bitmask"].shape == (N, -(-K["bitmask"] // 8))
    np.testing.assert_array_equal(view["shape"], [N, K["bitmask"]])
    starts = np.concatenate([[0], np.cumsum((w_oi != 0).sum(1))[:-1]])
    np.testing.assert_array_equal(view["row_offsets"], starts)
    back = bitmask.from_compressed_tensors(view, block_k=128)
    np.testing.assert_array_equal(np.asarray(kernels.unpack(back)), w)


def test_two_four_layout_is_the_documented_one():
    w = sparse_weight("2:4", (K["2:4"], N))
    p = pack("2:4", w)
    values, meta = np.asarray(p.values), np.asarray(p.meta)
    half = values.shape[1] // 2
    seen = set()
    for g in (0, 1, 5, 40, 69):
        for n in (0, 1, 64, 129):
            byte = meta[g % half, n]
            code = byte & 15 if g < half else byte >> 4
            i0, i1 = code & 3, code >> 2
            group = w[4 * g:4 * g + 4, n]
            kept = np.flatnonzero(group)  # the default mask: the nonzeros
            if kept.size == 2:
                assert (i0, i1) == tuple(kept)
                np.testing.assert_array_equal(values[:, g, n], group[kept])
            elif kept.size == 1:
                assert i0 == i1 == kept[0] and values[0, g, n] == group[i0]
                assert values[1, g, n] == 0
            else:
                assert (i0, i1) == (1, 0) and not values[:, g, n].any()
            seen.add(kept.size)
    assert seen == {0, 1, 2}


def test_bad_packs_are_clear_errors():
    dense = jnp.ones((8, 4))
    with pytest.raises(ValueError, match="not 2:4: 8 groups"):
        kernels.pack(dense, "2:4")
    with pytest.raises(ValueError, match="multiple of 4"):
        kernels.pack(jnp.zeros((6, 4)), "2:4")
    with pytest.raises(ValueError, match="unknown packed format"):
        kernels.pack(dense, "4:8")
    with pytest.raises(ValueError, match="takes 200"):
        kernels.matmul(jnp.ones((2, 7)), pack("bitmask", sparse_weight("bitmask", (200, N))))


def _tolerance(dtype):
    return {"rtol": 1e-5, "atol": 1e-4} if dtype == jnp.float32 else {"rtol": 0, "atol": 0.15}


# bf16 on the GPU kernel only: the TPU kernel shares the tile math and its casts.
@pytest.mark.parametrize("fmt,kernel,dtype", [
    *((f, k, jnp.float32) for f, k in KERNEL), *((f, "gpu", jnp.bfloat16) for f in K)])
def test_kernel_forward_matches_float64(fmt, kernel, dtype):
    w = jnp.asarray(sparse_weight(fmt, (K[fmt], N), seed=1), dtype)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(M, K[fmt])), dtype)
    y = KERNEL[fmt, kernel](x, pack(fmt, w), interpret=True)
    assert y.shape == (M, N) and y.dtype == dtype
    want = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    np.testing.assert_allclose(np.asarray(y, np.float64), want, **_tolerance(dtype))


# The VJP rule is the same for every kernel; one case runs it over a Pallas kernel's forward.
@pytest.mark.parametrize("fmt,kernel", [("bitmask", "reference"), ("2:4", "gpu")])
def test_vjp_matches_autodiff_through_the_reference(fmt, kernel):
    w = sparse_weight(fmt, (K[fmt], N), seed=4)
    p = pack(fmt, w)
    x = jnp.asarray(np.random.default_rng(5).normal(size=(2, 3, K[fmt])), jnp.float32)

    def loss(x, p):
        return jnp.sum(jnp.sin(kernels.matmul(x, p, kernel=kernel, interpret=True)))

    def reference(x, values):
        return jnp.sum(jnp.sin(x @ kernels.unpack(dataclasses.replace(p, values=values))))

    gx, gp = jax.grad(loss, argnums=(0, 1), allow_int=True)(x, p)
    rx, rv = jax.grad(reference, argnums=(0, 1))(x, p.values)
    np.testing.assert_allclose(gx, rx, rtol=1e-5, atol=1e-4)
    # The weight gradient lives on the kept entries only (2:4 value slots of groups keeping
    # fewer than two hold zeros and get none): unpacked, it is zero where w is (this weight
    # keeps no zeros; test_a_kept_zero_stays_kept_in_the_mask_and_the_vjp has them).
    np.testing.assert_allclose(gp.values, np.where(p.values != 0, rv, 0), rtol=1e-5, atol=1e-4)
    dense_grad = np.asarray(kernels.unpack(dataclasses.replace(p, values=gp.values)))
    assert np.all(dense_grad[w == 0] == 0) and np.abs(dense_grad[w != 0]).min() > 0


def test_matmul_on_cpu_is_the_reference_and_keeps_batch_dims():
    w = sparse_weight("2:4", (K["2:4"], N), seed=6)
    x = np.random.default_rng(7).normal(size=(2, 3, K["2:4"])).astype(np.float32)
    y = kernels.matmul(jnp.asarray(x), pack("2:4", w))
    assert kernels.ops.default_kernel() == "reference" and y.shape == (2, 3, N)
    np.testing.assert_allclose(y, x @ w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt,kernel", list(KERNEL))
def test_kernels_lower_for_their_backend(fmt, kernel):
    """Pallas lowers each kernel to Triton IR / Mosaic MLIR here; the backend compiler's own
    passes run only on the device (not checked here)."""
    shape = (1024, 256)
    w = jnp.asarray(sparse_weight(fmt, shape, seed=8), jnp.bfloat16)
    x = jnp.ones((16, shape[0]), jnp.bfloat16)
    platform = {"gpu": "cuda", "tpu": "tpu"}[kernel]
    triton = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    exported = export.export(KERNEL[fmt, kernel], platforms=[platform],
                             disabled_checks=[triton])(x, kernels.pack(w, fmt))
    text = exported.mlir_module()
    assert ("tpu_custom_call" if kernel == "tpu" else "xla.gpu.triton") in text


# A toy format written as a new module would be: what the base and the registry promise.
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _ToyWeight(packed.PackedWeight):
    values: Any  # (..., 1, K, N): w off the mask zeroed
    mask: Any
    shape: tuple[int, int] = dataclasses.field(metadata={"static": True})

    PACKED_AXES = {"values": ("packed_one", "packed_k"), "mask": ("packed_k",)}

    @property
    def packing(self) -> packed.Format:
        return _TOY


def _toy_pack(w, *, mask=None):
    m = packed.kept_mask(w, mask)
    return _ToyWeight(values=jnp.where(m, w, 0)[..., None, :, :], mask=m, shape=w.shape[-2:])


def _toy_kernel(x, p, *, block_m, interpret):
    del block_m, interpret
    return packed.matmul_reference(x, p)


_TOY = packed.Format(
    name="toy", pack=_toy_pack, unpack=lambda p: p.values[..., 0, :, :],
    unpack_mask=lambda p: p.mask,
    values_cotangent=lambda p, g: p.cotangent(jnp.where(p.mask, g, 0)[None]),
    kernels={"gpu": _toy_kernel, "tpu": _toy_kernel, "reference": packed.matmul_reference})


def test_a_new_format_is_one_module_and_one_registry_entry(monkeypatch):
    monkeypatch.setitem(kernels.ops.FORMATS, _TOY.name, _TOY)  # the one line in ops.py
    w = sparse_weight("bitmask", (K["bitmask"], N), seed=9)
    x = jnp.asarray(np.random.default_rng(10).normal(size=(2, K["bitmask"])), jnp.float32)
    p = kernels.pack(jnp.asarray(w), "toy")
    assert kernels.is_packed(p) and p.format == "toy" and p.nbytes == w.size * 4 + w.size
    assert p.logical_axes(("embed", "mlp")).mask == ("packed_k", "mlp")
    np.testing.assert_array_equal(np.asarray(kernels.unpack_mask(p)), w != 0)
    for kernel in ("reference", "gpu"):
        np.testing.assert_allclose(kernels.matmul(x, p, kernel=kernel), x @ w, rtol=1e-5,
                                   atol=1e-4)
    np.testing.assert_allclose(p.matmul(x), x @ w, rtol=1e-5, atol=1e-4)
    g = jax.grad(lambda p: jnp.sum(kernels.matmul(x, p)), allow_int=True)(p)
    assert g.mask.dtype == jax.dtypes.float0 and np.all(np.asarray(g.values)[0][w == 0] == 0)
