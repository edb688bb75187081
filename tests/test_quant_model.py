"""SmoothQuant, the W8A8 weight type and the quantization spec on a tiny model built here
(the whole pass runs in test_quant_cli.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import quant_numpy as ref

from sparse_llama.ground.tree_paths import path_name
from sparse_llama.model import llama
from sparse_llama.model.config import preset
from sparse_llama.quant import calibrate, smoothquant, w8a8
from sparse_llama.sparsity import masks as masks_lib

CFG = preset("tiny").replace(num_layers=2, hidden_size=48, intermediate_size=80, num_heads=6,
                             num_kv_heads=2, vocab_size=101, max_position_embeddings=64,
                             scan_layers=False)


@pytest.fixture(scope="module")
def sparse_model():
    """Random tiny params whose targeted linears are 50% magnitude-pruned, and windows."""
    params = jax.device_get(llama.init_params(jax.random.key(0), CFG))
    params = jax.tree_util.tree_map_with_path(
        lambda path, w: w * (np.abs(w) > np.median(np.abs(w)))
        if masks_lib.is_target(path_name(path)) else w, params)
    # Uneven norm scales: SmoothQuant must divide the right ones.
    layers = dict(params["layers"])
    for norm, key in (("input_layernorm", 1), ("post_attention_layernorm", 2)):
        layers[norm] = jax.random.uniform(jax.random.key(key), layers[norm].shape, minval=0.2,
                                          maxval=3.0)
    params = jax.tree.map(jnp.asarray, {**params, "layers": layers})
    windows = np.asarray(jax.random.randint(jax.random.key(3), (8, 32), 0, CFG.vocab_size))
    return params, windows


def test_smoothing_scales_follow_the_formula_and_keep_dead_channels():
    rng = np.random.default_rng(0)
    act = np.abs(rng.normal(size=8)).astype(np.float32) * 10
    act[2] = 0.0
    ws = [rng.normal(size=(8, 5)).astype(np.float32), rng.normal(size=(8, 3)).astype(np.float32)]
    ws[0][5], ws[1][5] = 0.0, 0.0  # an input channel whose weights are all pruned
    got = np.asarray(smoothquant.smoothing_scales(jnp.asarray(act), [jnp.asarray(w) for w in ws],
                                                  0.7))
    w_max = np.maximum(np.abs(ws[0]).max(1), np.abs(ws[1]).max(1)).astype(np.float64)
    w_max[5] = 1.0
    want = act.astype(np.float64) ** 0.7 / w_max ** 0.3
    want[[2, 5]] = 1.0
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_smoothquant_leaves_the_float_forward_unchanged_and_zeros_zero(sparse_model):
    params, windows = sparse_model
    rng = np.random.default_rng(1)
    smoothed = params
    for i in range(CFG.num_layers):
        absmax = {tap: jnp.asarray(np.exp(rng.normal(size=CFG.hidden_size) * 2), jnp.float32)
                  for tap in smoothquant.TAPS}
        block = smoothquant.smooth_block(llama.layer_params(params, i), absmax, 0.5)
        smoothed = llama.set_layer_params(smoothed, i, block)
    assert not np.allclose(smoothed["layers"]["input_layernorm"],
                           params["layers"]["input_layernorm"])
    want = llama.forward(params, jnp.asarray(windows), CFG)
    got = llama.forward(smoothed, jnp.asarray(windows), CFG)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    zeros = jax.tree.map(lambda a, b: bool(jnp.all((a == 0) == (b == 0))), params, smoothed)
    assert all(jax.tree.leaves(zeros))


def test_w8a8_matmul_matches_the_numpy_integer_reference_exactly():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 5, 24)).astype(np.float32)
    x[0, 1] *= 40.0  # an outlier token gets its own scale
    x[1, 3] = 0.0  # an all-zero token: scale 1, codes 0
    codes = rng.integers(-127, 128, size=(24, 7)).astype(np.int8)
    scale = np.exp(rng.normal(size=7)).astype(np.float32) / 100
    qx, acc, want = ref.w8a8(x.reshape(-1, 24), codes, scale)
    got_qx, _ = w8a8.quantize_tokens(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(got_qx).reshape(-1, 24), qx)
    got_acc = w8a8.int32_accumulate(got_qx, jnp.asarray(codes))
    assert got_acc.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got_acc).reshape(-1, 7), acc)
    weight = w8a8.Int8Weight(jnp.asarray(codes), jnp.asarray(scale))
    got = weight.matmul(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(got).reshape(-1, 7), want, rtol=1e-6, atol=1e-9)
    assert weight.matmul(jnp.asarray(x, jnp.bfloat16)).dtype == jnp.bfloat16


def test_from_float_recovers_codes_on_a_grid_and_rtn_scales():
    rng = np.random.default_rng(3)
    codes = rng.integers(-127, 128, size=(3, 16, 8))
    scale = np.exp(rng.normal(size=(3, 8))).astype(np.float32)
    w = (codes * scale[:, None, :]).astype(np.float32)
    q = w8a8.from_float(jnp.asarray(w), jnp.asarray(scale))
    np.testing.assert_array_equal(np.asarray(q.codes), codes)
    rtn = w8a8.from_float(jnp.asarray(w))
    np.testing.assert_allclose(np.asarray(rtn.scale), np.abs(w).max(1) / 127, rtol=1e-6)
    assert np.abs(np.asarray(rtn.codes)).max(1).min() == 127


@pytest.mark.parametrize("kwargs,match", [
    (dict(bits=6), "quant.bits=6"),
    (dict(smoothquant_alpha=1.5), "smoothquant_alpha"),
    (dict(activations="int8_dynamic", bits=4), "W8A8"),
    (dict(method="awq"), "quant.method"),
])
def test_bad_spec_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        calibrate.QuantSpec(**kwargs)


def test_group_size_that_does_not_divide_a_width_is_refused_before_work():
    spec = calibrate.QuantSpec(bits=4, group_size=32, activations="none")
    with pytest.raises(ValueError, match="group_size=32 does not divide the 48 inputs"):
        calibrate.check_against_model(spec, CFG)
