"""Wanda, magnitude, the shared selection rules, input statistics and quantization grids."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_llama.pruning import hessian, magnitude, quantize, wanda
from sparse_llama.sparsity.masks import NM_AXIS_HF, check_nm
from sparse_llama.sparsity.selection import (
    NonFiniteError,
    count_for,
    mask_smallest,
    mask_smallest_nm,
)


def _smallest_reference(scores, k, forced, excluded):
    """Stable-argsort reference of `mask_smallest` on one problem (any shape): True = pruned."""
    flat, f, e = scores.reshape(-1), forced.reshape(-1), excluded.reshape(-1)
    candidates = ~f & ~e
    k_new = int(np.clip(k - f.sum(), 0, candidates.sum()))
    order = np.argsort(np.where(candidates, flat, np.inf), kind="stable")
    pruned = f.copy()
    pruned[order[:k_new]] = True
    return pruned.reshape(scores.shape)


def _nm_reference(scores, n, m, forced):
    """Per group of m along the last axis: forced first, then the n smallest (stable)."""
    pruned = forced.copy()
    for idx in np.ndindex(scores.shape[:-1]):
        for g in range(0, scores.shape[-1], m):
            s = np.where(forced[idx][g:g + m], -np.inf, scores[idx][g:g + m])
            pruned[idx + (g + np.argsort(s, kind="stable")[:n],)] = True
    return pruned


@functools.partial(jax.jit, static_argnames=("batch_dims",))
def _jit_smallest(scores, k, forced, excluded, batch_dims):
    """True = pruned, from the keep-polarity library function (forced: True = pruned)."""
    return ~mask_smallest(scores, k, mask=~forced, excluded=excluded, batch_dims=batch_dims)


def test_mask_smallest_is_a_stable_argsort_with_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(6, 10)).astype(np.float32)  # many ties
    scores[0, 0] = -0.0  # sorts as +0.0
    forced = rng.random((6, 10)) < 0.2
    excluded = rng.random((6, 10)) < 0.2
    for k in (0, 1, 17, 30, 60):  # 60: more than the candidates
        got = _jit_smallest(jnp.asarray(scores), k, jnp.asarray(forced), jnp.asarray(excluded), 0)
        np.testing.assert_array_equal(np.asarray(got),
                                      _smallest_reference(scores, k, forced, excluded))
    per_row = _jit_smallest(jnp.asarray(scores), 4, jnp.asarray(forced), jnp.asarray(excluded), 1)
    want = np.stack([_smallest_reference(s, 4, f, e)
                     for s, f, e in zip(scores, forced, excluded, strict=True)])
    np.testing.assert_array_equal(np.asarray(per_row), want)


def test_mask_smallest_nm_breaks_ties_by_position():
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 3, size=(5, 16)).astype(np.float32)
    forced = rng.random((5, 16)) < 0.25
    got = mask_smallest_nm(jnp.asarray(scores), 2, 4, mask=jnp.asarray(~forced))
    np.testing.assert_array_equal(~np.asarray(got), _nm_reference(scores, 2, 4, forced))
    along0 = mask_smallest_nm(jnp.asarray(scores.T), 2, 4, mask=jnp.asarray(~forced.T), axis=0)
    np.testing.assert_array_equal(np.asarray(along0).T, np.asarray(got))


@pytest.mark.parametrize("nan", [np.float32(np.nan), -np.float32(np.nan)],
                         ids=["+nan", "-nan"])
def test_nan_scores_are_never_pruned_whatever_their_sign(nan):
    # -NaN has a negative int32 bit pattern: the bisection on float bits pruned it first.
    scores = np.arange(1.0, 9.0, dtype=np.float32).reshape(2, 4)
    scores[0, 2] = scores[1, 0] = nan
    assert np.signbit(scores[0, 2]) == np.signbit(nan)  # the sign survived the assignment
    keep = np.asarray(mask_smallest(jnp.asarray(scores), 3))
    # The three smallest finite scores 1, 2, 4 go; both NaNs stay (fails if a NaN is pruned).
    np.testing.assert_array_equal(keep, [[False, False, True, False], [True, True, True, True]])
    per_row = np.asarray(mask_smallest(jnp.asarray(scores), 2, batch_dims=1))
    np.testing.assert_array_equal(per_row, [[False, False, True, True], [True, False, False, True]])
    # N:M ranks NaN as +inf: 2:4 prunes the two smallest finite entries of each group.
    nm = np.asarray(mask_smallest_nm(jnp.asarray(scores), 2, 4))
    np.testing.assert_array_equal(nm, [[False, False, True, True], [True, False, False, True]])


def test_solvers_refuse_nan_and_inf():
    w, x = _layer()
    sq = jnp.asarray((x ** 2).sum(axis=(0, 1)))
    bad_w = jnp.asarray(w).at[3, 7].set(-jnp.nan)
    with pytest.raises(NonFiniteError, match="the weight has 1 NaN/inf"):
        magnitude.prune_layer(bad_w, sparsity=0.5)
    with pytest.raises(NonFiniteError, match="the weight has 1 NaN/inf"):
        wanda.prune_layer(bad_w, sq, sparsity=0.5)
    with pytest.raises(NonFiniteError, match="squared input norms has 1 NaN/inf"):
        wanda.prune_layer(jnp.asarray(w), sq.at[5].set(jnp.inf), sparsity=0.5)


def _layer(rows=16, cols=64, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(rows, cols)).astype(np.float32)
    x = (rng.normal(size=(2, 20, cols)) * np.exp(rng.normal(size=cols))).astype(np.float32)
    return w, x


def test_sq_norm_accumulator_sums_over_all_tokens():
    _, x = _layer()
    state = hessian.init_sq_norms(64)
    for batch in x:
        state = hessian.accumulate_sq_norms(state, jnp.asarray(batch[None]))
    np.testing.assert_allclose(np.asarray(hessian.finalize_sq_norms(state)),
                               (x.astype(np.float64) ** 2).sum(axis=(0, 1)), rtol=1e-5)
    assert int(state.tokens) == 40


def test_wanda_prunes_the_smallest_weight_times_input_norm_per_row():
    w, x = _layer()
    sq = (x.astype(np.float64) ** 2).sum(axis=(0, 1))
    got, mask = wanda.prune_layer(jnp.asarray(w), jnp.asarray(sq, jnp.float32), sparsity=0.6)
    got, mask = np.asarray(got), np.asarray(mask)
    scores = np.abs(w) * np.sqrt(sq)
    none = np.zeros(w.shape[1], bool)
    want = np.stack([_smallest_reference(s, count_for(0.6, 64), none, none) for s in scores])
    np.testing.assert_array_equal(~mask, want)
    np.testing.assert_array_equal(got, np.where(mask, w, 0.0))
    # diag(H) is the same statistic up to a global factor: same mask.
    state = hessian.accumulate(hessian.init(64), jnp.asarray(x))
    _, mask_h = wanda.prune_layer(jnp.asarray(w), jnp.diag(hessian.finalize(state)), sparsity=0.6)
    np.testing.assert_array_equal(np.asarray(mask_h), mask)


def test_wanda_nm_and_mask_extension():
    w, x = _layer(seed=2)
    sq = jnp.asarray((x ** 2).sum(axis=(0, 1)))
    got, mask = wanda.prune_layer(jnp.asarray(w), sq, sparsity=0.0, n=2, m=4)
    assert check_nm(np.asarray(mask), 2, 4, axis=NM_AXIS_HF)
    want = _nm_reference(np.abs(w) * np.sqrt(np.asarray(sq)), 2, 4, np.zeros(w.shape, bool))
    np.testing.assert_array_equal(~np.asarray(mask), want)
    old = np.asarray(wanda.prune_layer(jnp.asarray(w), sq, sparsity=0.5)[1])
    got, mask = wanda.prune_layer(jnp.asarray(w) * old, sq, sparsity=0.75, mask=jnp.asarray(old))
    mask = np.asarray(mask)
    assert not np.any(mask & ~old)
    assert np.all((~mask).sum(axis=1) == count_for(0.75, 64))
    assert np.all(np.asarray(got)[~mask] == 0.0)


def test_magnitude_uses_one_threshold_per_matrix():
    w, _ = _layer(seed=3)
    got, mask = magnitude.prune_layer(jnp.asarray(w), sparsity=0.7)
    none = np.zeros(w.shape, bool)
    want = _smallest_reference(np.abs(w), count_for(0.7, w.size), none, none)
    np.testing.assert_array_equal(~np.asarray(mask), want)
    np.testing.assert_array_equal(np.asarray(got), np.where(np.asarray(mask), w, 0.0))
    assert (~np.asarray(mask)).sum(axis=1).std() > 0  # not per row


def test_magnitude_nm_extension_and_dtype():
    w, _ = _layer(seed=4)
    old = np.random.default_rng(5).random(w.shape) > 0.2
    got, mask = magnitude.prune_layer(jnp.asarray(w, jnp.bfloat16), sparsity=0.0, n=4, m=8,
                                      mask=jnp.asarray(old))
    mask = np.asarray(mask)
    assert got.dtype == jnp.bfloat16
    assert check_nm(mask, 4, 8, axis=NM_AXIS_HF) and not np.any(mask & ~old)
    assert np.all(np.asarray(got, np.float32)[~mask] == 0.0)


@pytest.mark.parametrize("call,match", [
    (lambda w: wanda.prune_layer(w, jnp.ones(63), sparsity=0.5), "input_sq_norms"),
    (lambda w: wanda.prune_layer(w, jnp.ones(64), sparsity=1.5), "sparsity"),
    (lambda w: wanda.prune_layer(w, jnp.ones(64), sparsity=0.5, n=4, m=2), "n=4 > m=2"),
    (lambda w: magnitude.prune_layer(w, sparsity=0.5, n=2, m=5), "does not divide"),
    (lambda w: magnitude.prune_layer(w, sparsity=0.5, mask=jnp.ones((64, 16), bool)), "mask"),
])
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call(jnp.ones((16, 64)))


def test_asymmetric_grid_keeps_zero_exact():
    rng = np.random.default_rng(6)
    w = rng.normal(size=(5, 32)).astype(np.float32) + 0.5
    w[2] = 0.0  # an all-zero row
    grid = quantize.minmax_grid(jnp.asarray(w), 4)
    codes = np.asarray(quantize.quantize(jnp.asarray(w), grid))
    assert codes.min() >= 0 and codes.max() <= 15
    assert np.all(np.asarray(quantize.fake_quantize(jnp.zeros((5, 3)), grid)) == 0.0)
    deq = np.asarray(quantize.dequantize(jnp.asarray(codes), grid))
    np.testing.assert_array_equal(deq, np.asarray(quantize.fake_quantize(jnp.asarray(w), grid)))
    assert np.abs(deq - w).max() <= 0.5 * float(np.asarray(grid.scale).max()) + 1e-6


def test_symmetric_int8_grid_is_absmax_over_127():
    w = jnp.asarray([[1.0, -2.54, 0.3], [0.0, 0.0, 0.0]])
    grid = quantize.minmax_grid(w, 8, sym=True)
    np.testing.assert_allclose(np.asarray(grid.scale)[:, 0], [2.54 / 127, 1.0], rtol=1e-6)
    codes = np.asarray(quantize.quantize(w, grid))
    assert codes[0, 1] == -127 and np.all(codes[1] == 0)
    with pytest.raises(ValueError, match="bits"):
        quantize.minmax_grid(w, 1)
