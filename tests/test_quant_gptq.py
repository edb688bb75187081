"""Sparsity-preserving GPTQ and RTN (sparse_llama/quant/gptq.py) against the float64
transcription in tests/quant_numpy.py, plus the zero-keeping contract."""

import jax.numpy as jnp
import numpy as np
import pytest
import quant_numpy as ref

from sparse_llama.pruning import hessian, sparsegpt
from sparse_llama.quant import gptq


def _layer(rows, cols, seed=0):
    """(weight (rows, cols) with a few outliers, Hessian of correlated inputs)."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(cols, cols)) / np.sqrt(cols) + np.eye(cols)
    x = rng.normal(size=(2, 48, cols)) @ mix * np.exp(rng.normal(size=cols))
    h = hessian.finalize(hessian.accumulate(hessian.init(cols), jnp.asarray(x, jnp.float32)))
    w = rng.normal(size=(rows, cols)).astype(np.float32)
    w[rng.integers(0, rows, 4), rng.integers(0, cols, 4)] *= 6.0
    return w, np.asarray(h)


def _sparse(w, h):
    pruned, mask = sparsegpt.prune_layer(jnp.asarray(w), h, sparsity=0.5, block_size=64)
    return np.asarray(pruned), np.asarray(mask)


CASES = {
    "int8 per channel, 50% sparse": dict(bits=8, sparse=True),
    "int4 group 128 (two blocks)": dict(bits=4, group_size=128),
    "int4 group 32 (inside a block), act-order, 50% sparse": dict(
        bits=4, group_size=32, act_order=True, sparse=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_gptq_matches_float64_reference_and_keeps_zeros(case):
    kw = dict(CASES[case])
    sparse, sym = kw.pop("sparse", False), True
    w, h = _layer(16, 256, seed=len(case))
    mask = None
    if sparse:
        w, mask = _sparse(w, h)
    got = gptq.gptq_layer(jnp.asarray(w), h, sym=sym, block_size=64, mask=mask, **kw)
    want, tie = ref.gptq(w, h, sym=sym, block_size=64, mask=mask, **kw)
    got_w = np.asarray(got.weight)
    # Rows are independent: a row whose reference never came near a rounding tie must match;
    # a near-tie may round the other way in float32 and change the rest of its row.
    clean = tie > 1e-5
    assert clean.mean() >= 0.75, tie
    np.testing.assert_allclose(got_w[clean], want[clean], rtol=0,
                               atol=1e-5 * np.abs(want).max())
    if mask is not None:
        assert np.all(got_w[~mask] == 0.0)  # exact zeros, never touched
        assert np.count_nonzero(got_w[mask]) > 0.9 * mask.sum()
    # The weights lie on the returned grid, with codes in range.
    codes = np.asarray(gptq.codes(got))
    qmax = 2 ** (kw["bits"] - 1) - 1 if sym else 2 ** kw["bits"] - 1
    assert codes.min() >= (-qmax if sym else 0) and codes.max() <= qmax
    deq = np.asarray(got.scale)[:, np.asarray(got.g_idx)] * (
        codes - np.asarray(got.zero)[:, np.asarray(got.g_idx)])
    np.testing.assert_allclose(deq, got_w, rtol=0, atol=1e-6 * np.abs(got_w).max())
    if kw.get("group_size"):
        assert got.scale.shape == (16, 256 // kw["group_size"])


def test_gptq_beats_rtn_on_the_layer_output():
    w, h = _layer(16, 256, seed=3)
    w, mask = _sparse(w, h)

    def err(q):
        d = np.asarray(q.weight, np.float64) - w
        return float(np.trace(d @ h @ d.T))

    # int8 per channel with a mask and block 64: the compile of the first reference case.
    g = gptq.gptq_layer(jnp.asarray(w), h, bits=8, block_size=64, mask=mask)
    r = gptq.rtn_layer(jnp.asarray(w), bits=8, mask=mask)
    assert err(g) < 0.8 * err(r)
    assert np.all(np.asarray(r.weight)[~mask] == 0.0)
    # RTN is plain rounding on the symmetric per-channel grid.
    scale, zero, qmin, qmax = ref.minmax(w.astype(np.float64), 8, True)
    want = scale[:, None] * np.clip(np.round(w / scale[:, None]), qmin, qmax)
    np.testing.assert_allclose(np.asarray(r.weight), want, rtol=0, atol=1e-6)


def test_rtn_groups_have_their_own_scales():
    w, _ = _layer(8, 64, seed=4)
    r = gptq.rtn_layer(jnp.asarray(w), bits=4, group_size=16)
    assert r.scale.shape == (8, 4)
    np.testing.assert_allclose(np.asarray(r.scale),
                               np.abs(w).reshape(8, 4, 16).max(-1) / 7, rtol=1e-6)


@pytest.mark.parametrize("group", [-1, 48])
def test_bad_group_size_is_refused(group):
    with pytest.raises(ValueError, match="group_size"):
        gptq.gptq_layer(jnp.ones((4, 64)), jnp.eye(64), bits=4, group_size=group)
