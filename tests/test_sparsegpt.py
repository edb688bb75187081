"""SparseGPT / GPTQ solver against the float64 numpy transcription, plus its contracts.

Compiles dominate the run time, so the tests share two layer shapes: (16, 200) with
block_size=64 (a partial last block of 8) and (16, 160) with the default block of 128.
"""

import warnings

import jax.numpy as jnp
import numpy as np
import pytest
import sparsegpt_numpy as ref

from sparse_llama.pruning import hessian, magnitude, quantize, sparsegpt, wanda
from sparse_llama.sparsity import selection
from sparse_llama.sparsity.masks import NM_AXIS_HF, check_nm


def _inputs(cols, *, seed=0, batches=2, dead=()):
    """Correlated calibration inputs (b, t, cols): a random mixing of iid features."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(cols, cols)) / np.sqrt(cols) + np.eye(cols)
    scale = np.exp(rng.normal(size=cols))  # uneven feature norms, as in real activations
    x = (rng.normal(size=(batches, 24, cols)) @ mix * scale).astype(np.float32)
    x[..., list(dead)] = 0.0
    return x


def _layer(rows, cols, *, seed=0, dead=()):
    """(weight (rows, cols), Hessian from `hessian.accumulate`, inputs (tokens, cols))."""
    x = _inputs(cols, seed=seed, dead=dead)
    state = hessian.init(cols)
    for batch in x:  # two accumulate calls: exercises the running average
        state = hessian.accumulate(state, jnp.asarray(batch[None]))
    w = np.random.default_rng(seed + 1).normal(size=(rows, cols)).astype(np.float32)
    return w, hessian.finalize(state), x.reshape(-1, cols)


def test_hessian_is_running_average_over_sequences():
    x = _inputs(12, batches=3)
    state = hessian.accumulate(hessian.init(12), jnp.asarray(x[:1]))
    state = hessian.accumulate(state, jnp.asarray(x[1:]))
    expected = 2.0 / 3 * sum(seq.T.astype(np.float64) @ seq for seq in x)
    np.testing.assert_allclose(np.asarray(hessian.finalize(state)), expected, rtol=1e-5,
                               atol=1e-5 * np.abs(expected).max())
    assert int(state.count) == 3


CASES = {
    "50%, partial last block": dict(cols=200, block_size=64, sparsity=0.5),
    "70%, dead inputs": dict(cols=200, block_size=64, sparsity=0.7, dead=(3, 70, 199)),
    "2:4, default block, partial": dict(cols=160, sparsity=0.5, n=2, m=4),
    "4:8, partial last block": dict(cols=200, block_size=64, sparsity=0.5, n=4, m=8),
    "50% -> 70% mask extension": dict(cols=200, block_size=64, sparsity=0.7, extend=0.5),
    "2:4 on a 30% mask": dict(cols=200, block_size=64, sparsity=0.5, n=2, m=4, extend=0.3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_float64_reference(case):
    kw = dict(CASES[case])
    cols, dead, extend = kw.pop("cols"), kw.pop("dead", ()), kw.pop("extend", None)
    w, h, _ = _layer(16, cols, dead=dead)
    mask = None
    if extend is not None:  # an existing unstructured mask with its zeros in the weight
        w, mask = sparsegpt.prune_layer(jnp.asarray(w), h, sparsity=extend, block_size=64)
        w, mask = np.asarray(w), np.asarray(mask)
    got_w, got_mask = sparsegpt.prune_layer(jnp.asarray(w), h, mask=mask, **kw)
    want_w, want_mask = ref.sparsegpt(w, np.asarray(h), mask=mask, **kw)
    np.testing.assert_array_equal(np.asarray(got_mask), want_mask)
    np.testing.assert_allclose(np.asarray(got_w), want_w, rtol=0,
                               atol=1e-4 * np.abs(want_w).max())
    got_w, got_mask = np.asarray(got_w), np.asarray(got_mask)
    assert np.all(got_w[~got_mask] == 0.0)  # exact zeros, not small values
    if dead:
        assert np.all(got_w[:, list(dead)] == 0.0)
    if mask is not None:
        assert not np.any(got_mask & ~mask)  # old zeros stay pruned
    if kw.get("n"):
        assert check_nm(got_mask, kw["n"], kw["m"], axis=NM_AXIS_HF)


def test_unstructured_sparsity_is_exact_per_row_block():
    w, h, _ = _layer(16, 200, seed=2)
    # numpy inputs are accepted as well
    _, mask = sparsegpt.prune_layer(w, np.asarray(h), sparsity=0.7, block_size=64)
    mask = np.asarray(mask)
    for start in range(0, 200, 64):
        block = mask[:, start:start + 64]
        assert (~block).sum() == selection.count_for(0.7, block.size)


def test_one_compile_serves_every_sparsity_of_a_shape():
    w, h, _ = _layer(16, 200, seed=3)
    sparsegpt.prune_layer(jnp.asarray(w), h, sparsity=0.5, block_size=64)
    size = sparsegpt._sweep._cache_size()
    for s in (0.3, 0.6, 0.8):
        sparsegpt.prune_layer(jnp.asarray(w), h, sparsity=s, block_size=64)
    assert sparsegpt._sweep._cache_size() == size


def test_keeps_dtype():
    w, h, _ = _layer(16, 160, seed=4)
    got, mask = sparsegpt.prune_layer(jnp.asarray(w, jnp.bfloat16), h, sparsity=0.5)
    assert got.dtype == jnp.bfloat16 and mask.dtype == jnp.bool_
    assert np.all(np.asarray(got, np.float32)[~np.asarray(mask)] == 0.0)


def _recon_error(w, w_new, x):
    return float(np.sum(((np.asarray(w, np.float64) - np.asarray(w_new, np.float64)) @ x.T) ** 2))


@pytest.mark.parametrize("nm", [(0, 0), (2, 4)])
def test_reconstruction_error_far_below_wanda_and_magnitude(nm):
    n, m = nm
    rng = np.random.default_rng(5)
    # Strongly correlated features (40 latent factors + noise), uneven norms, full-rank H.
    x = (rng.normal(size=(256, 40)) @ rng.normal(size=(40, 160))
         + 0.3 * rng.normal(size=(256, 160))) * np.exp(rng.normal(size=160))
    x = x.astype(np.float32)
    h = hessian.finalize(hessian.accumulate(hessian.init(160), jnp.asarray(x[None])))
    sq = hessian.finalize_sq_norms(
        hessian.accumulate_sq_norms(hessian.init_sq_norms(160), jnp.asarray(x[None])))
    w = rng.normal(size=(16, 160)).astype(np.float32)
    err = {
        "sparsegpt": sparsegpt.prune_layer(jnp.asarray(w), h, sparsity=0.5, n=n, m=m)[0],
        "wanda": wanda.prune_layer(jnp.asarray(w), sq, sparsity=0.5, n=n, m=m)[0],
        "magnitude": magnitude.prune_layer(jnp.asarray(w), sparsity=0.5, n=n, m=m)[0],
    }
    err = {k: _recon_error(w, v, x) for k, v in err.items()}
    assert 2 * err["sparsegpt"] < err["wanda"] < err["magnitude"], err


def test_joint_quantization_prunes_to_zero_and_keeps_grid_values():
    w, h, x = _layer(16, 160, seed=6)
    got, mask = sparsegpt.prune_layer(jnp.asarray(w), h, sparsity=0.5, quant_bits=4)
    got, mask = np.asarray(got), np.asarray(mask)
    assert np.all(got[~mask] == 0.0)
    assert (~mask).sum() == selection.count_for(0.5, mask.size)
    grid = quantize.minmax_grid(jnp.asarray(w), 4)  # from the unpruned weights
    np.testing.assert_allclose(np.asarray(quantize.fake_quantize(jnp.asarray(got), grid)), got,
                               rtol=0, atol=1e-6)
    assert len(np.unique(np.asarray(quantize.quantize(jnp.asarray(got), grid))[0])) <= 16
    g = tuple(np.asarray(a, np.float64).reshape(-1) for a in grid)
    want, want_mask = ref.sparsegpt(w, np.asarray(h), sparsity=0.5,
                                    grid=(g[0], g[1], g[2][0], g[3][0]))
    np.testing.assert_array_equal(mask, want_mask)
    # Rounding ties may flip a few entries (float32 vs float64 before the rounding).
    assert np.isclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max()).mean() > 0.98


@pytest.mark.parametrize("bits,sym", [(4, False), (8, True)])
def test_gptq_beats_round_to_nearest(bits, sym):
    w, h, x = _layer(16, 160, seed=7)
    got, grid = sparsegpt.quantize_layer(jnp.asarray(w), h, bits=bits, sym=sym)
    np.testing.assert_allclose(np.asarray(quantize.fake_quantize(got, grid)), np.asarray(got),
                               rtol=0, atol=1e-6)
    rtn = quantize.fake_quantize(jnp.asarray(w), grid)
    assert _recon_error(w, got, x) < 0.8 * _recon_error(w, rtn, x)
    # The reference with the same grid: rounding ties may flip a few entries.
    g = tuple(np.asarray(a, np.float64).reshape(-1) for a in grid)
    want, _ = ref.sparsegpt(w, np.asarray(h), grid=(g[0], g[1], g[2][0], g[3][0]), prune=False)
    close = np.isclose(np.asarray(got), want, rtol=0, atol=1e-4 * np.abs(want).max())
    assert close.mean() > 0.98


def test_gptq_on_a_sparse_layer_keeps_zeros():
    w, h, _ = _layer(16, 160, seed=8)
    w, mask = sparsegpt.prune_layer(jnp.asarray(w), h, sparsity=0.5)
    got, grid = sparsegpt.quantize_layer(w, h, bits=4, mask=mask)
    got, mask = np.asarray(got), np.asarray(mask)
    assert np.all(got[~mask] == 0.0)
    assert np.count_nonzero(got[mask]) > 0.9 * mask.sum()


def test_nan_or_inf_raises_and_a_finite_failure_falls_back():
    w, h, _ = _layer(16, 160, seed=9)
    # Before: a NaN Hessian fell back to the identity with a warning and returned a "pruned"
    # layer; now it stops (the driver adds the block and tensor name).
    with pytest.raises(selection.NonFiniteError, match="Hessian of its inputs has 1 NaN/inf"):
        sparsegpt.prune_layer(jnp.asarray(w), h.at[3, 5].set(jnp.nan), sparsity=0.5)
    with pytest.raises(selection.NonFiniteError, match="the weight has 1 NaN/inf"):
        sparsegpt.prune_layer(jnp.asarray(w).at[0, 0].set(jnp.inf), h, sparsity=0.5)
    # A finite Hessian that no dampening rescues: identity (no compensation), with a warning.
    with pytest.warns(UserWarning, match="identity"):
        got, mask = sparsegpt.prune_layer(jnp.asarray(w), -1e6 * jnp.eye(160), sparsity=0.5,
                                          n=2, m=4)
    assert np.all(np.isfinite(np.asarray(got))) and np.all(np.asarray(got)[~np.asarray(mask)] == 0)


def test_indefinite_hessian_retries_with_more_dampening():
    rng = np.random.default_rng(10)
    q, _ = np.linalg.qr(rng.normal(size=(160, 160)))
    eig = np.ones(160)
    eig[-1] = -0.05  # fails at dampening 0.01, factorises at 0.1
    h = jnp.asarray((q * eig) @ q.T, jnp.float32)
    w = rng.normal(size=(16, 160)).astype(np.float32)
    with pytest.warns(UserWarning, match=r"succeeded with dampening=0\.1"):
        got, _ = sparsegpt.prune_layer(jnp.asarray(w), h, sparsity=0.5)
    assert np.all(np.isfinite(np.asarray(got)))
    with warnings.catch_warnings():  # a healthy Hessian is silent
        warnings.simplefilter("error")
        sparsegpt.prune_layer(jnp.asarray(w), jnp.eye(160), sparsity=0.5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(sparsity=1.0), "sparsity"),
    (dict(sparsity=-0.1), "sparsity"),
    (dict(sparsity=0.5, n=5, m=4), "n=5 > m=4"),
    (dict(sparsity=0.5, n=2, m=0), "both"),
    (dict(sparsity=0.5, n=3, m=7), "does not divide"),
    (dict(sparsity=0.5, n=2, m=4, block_size=30), "multiple of m"),
    (dict(sparsity=0.5, mask=jnp.ones((8, 63), bool)), "mask has shape"),
    (dict(sparsity=0.5, mask=jnp.ones((8, 64), jnp.int32)), "(?i)bool"),
    (dict(sparsity=0.5, hessian=jnp.eye(63)), "hessian has shape"),
    (dict(sparsity=0.5, dampening=-1.0), "dampening"),
])
def test_bad_input_raises_before_work(kwargs, match):
    kwargs = dict(kwargs)
    h = kwargs.pop("hessian", jnp.eye(64))
    with pytest.raises((ValueError, TypeError), match=match) as info:
        sparsegpt.prune_layer(jnp.ones((8, 64)), h, **kwargs)
    if "bool" not in match:  # a non-bool mask may be stopped earlier by the shape checker
        assert info.type is ValueError


def test_quantize_layer_needs_bits():
    with pytest.raises(ValueError, match="bits"):
        sparsegpt.quantize_layer(jnp.ones((4, 8)), jnp.eye(8), bits=1)


# Properties that follow from the algorithm itself (docs/algorithms.md, "SparseGPT"), not from
# the numpy transcription above: a misreading shared by both would not pass these.


def test_identity_hessian_makes_no_updates_and_prunes_smallest_magnitudes_per_block():
    """With H = I, U is diagonal (U_jj = 1/sqrt(1 + lambda)): no error reaches another column,
    and the score W^2 / U_jj^2 orders like |W|, so each (rows x block columns) group loses
    exactly its k smallest |W| and the kept weights are untouched."""
    rng = np.random.default_rng(11)
    w = rng.normal(size=(16, 200)).astype(np.float32)
    got, keep = sparsegpt.prune_layer(jnp.asarray(w), jnp.eye(200), sparsity=0.6, block_size=64)
    got, keep = np.asarray(got), np.asarray(keep)
    # Fails if any error update leaks (the kept weights would move).
    np.testing.assert_array_equal(got[keep], w[keep])
    for start in range(0, 200, 64):
        block = np.abs(w[:, start:start + 64])
        k = selection.count_for(0.6, block.size)
        want = block <= np.sort(block, axis=None)[k - 1]  # the k smallest (no ties: random)
        # Fails if the comparison group were a row (Wanda's) or the whole matrix (magnitude's).
        np.testing.assert_array_equal(~keep[:, start:start + 64], want)


def test_diagonal_hessian_scores_by_w_squared_times_damped_h_jj():
    """Diagonal H: U_jj^2 = 1 / (H_jj + lambda), so the score is W^2 (H_jj + lambda), with
    lambda = 0.01 mean(diag H); still no updates. Fails on W^2 / U_jj (unsquared) or W^2 U_jj^2."""
    rng = np.random.default_rng(12)
    w = rng.normal(size=(16, 160)).astype(np.float32)
    d = np.exp(2 * rng.normal(size=160)).astype(np.float32)  # input norms spanning e^-4..e^4
    got, keep = sparsegpt.prune_layer(jnp.asarray(w), jnp.diag(jnp.asarray(d)), sparsity=0.5)
    got, keep = np.asarray(got), np.asarray(keep)
    score = w.astype(np.float64) ** 2 * (d + 0.01 * d.mean())
    for start in (0, 128):  # the default block of 128 columns, then the partial one of 32
        block = score[:, start:start + 128]
        k = selection.count_for(0.5, block.size)
        np.testing.assert_array_equal(~keep[:, start:start + 128],
                                      block <= np.sort(block, axis=None)[k - 1])
    np.testing.assert_array_equal(got[keep], w[keep])


def test_pruning_leading_columns_gives_the_exact_least_squares_reconstruction():
    """OBS: removing weights one column at a time, each time re-fitting every later column
    optimally, ends at the joint optimum when the pruned columns come first. So when the
    selection prunes columns 0..p-1 of every row, the result must be the closed-form
    constrained least squares min ||(W - W') X||^2 (damped H) with W'[:, :p] = 0."""
    rng = np.random.default_rng(13)
    rows, cols, p = 8, 64, 16
    x = (rng.normal(size=(400, cols)) @ (rng.normal(size=(cols, cols)) / 8 + np.eye(cols)))
    h = hessian.finalize(hessian.accumulate(hessian.init(cols),
                                            jnp.asarray(x[None].astype(np.float32))))
    w = rng.normal(size=(rows, cols))
    w[:, :p] *= 1e-3  # the smallest scores by far: the selection is columns 0..p-1
    got, keep = sparsegpt.prune_layer(jnp.asarray(w, jnp.float32), h, sparsity=p / cols,
                                      block_size=cols)
    want_keep = np.ones((rows, cols), bool)
    want_keep[:, :p] = False
    np.testing.assert_array_equal(np.asarray(keep), want_keep)
    hd = np.asarray(h, np.float64)
    hd = hd + 0.01 * np.mean(np.diag(hd)) * np.eye(cols)
    # Free columns F re-fit: w'_F = w_F + H_FF^-1 H_FP w_P (rows independent).
    w32 = np.asarray(jnp.asarray(w, jnp.float32), np.float64)
    want = np.zeros_like(w32)
    want[:, p:] = w32[:, p:] + np.linalg.solve(hd[p:, p:], hd[p:, :p] @ w32[:, :p].T).T
    # Fails if the updates are missing, use the wrong row of U, or skip the lazy updates.
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0,
                               atol=1e-4 * np.abs(w32[:, :p]).max())


def test_unstructured_count_is_rounded_not_the_published_one_more():
    """Published code: thresh = sort(scores)[int(numel * sparsity)], prune scores <= thresh,
    i.e. floor(s * numel) + 1 entries per block (more with ties). Ours: exactly
    round(s * numel) (docs/algorithms.md, "SparseGPT": where we differ by convention)."""
    rng = np.random.default_rng(14)
    w = rng.normal(size=(16, 128)).astype(np.float32)
    _, keep = sparsegpt.prune_layer(jnp.asarray(w), jnp.eye(128), sparsity=0.5)
    scores = np.abs(w).ravel()
    published = int(np.sum(scores <= np.sort(scores)[int(scores.size * 0.5)]))
    assert published == 1025  # the reference's convention, computed here
    assert int((~np.asarray(keep)).sum()) == 1024 == published - 1
