"""The Llama forward: presets, invariants, subsets, masks, dtypes, config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_llama.model import layers, llama
from sparse_llama.model.config import PRESETS, param_count, preset
from sparse_llama.sparsity import masks as masks_lib

# Published parameter counts (billions) of the full-size presets.
PUBLISHED_B = {"llama2_7b": 6.74, "llama2_13b": 13.02, "llama2_70b": 68.98, "llama3_8b": 8.03}


@pytest.mark.parametrize("name", sorted(PUBLISHED_B))
def test_full_size_param_counts_without_allocating(name):
    cfg = preset(name)
    shapes = jax.eval_shape(lambda k: llama.init_params(k, cfg, jnp.bfloat16), jax.random.key(0))
    n = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
    assert n == param_count(cfg)
    assert n / 1e9 == pytest.approx(PUBLISHED_B[name], abs=0.005)
    assert all(s.dtype == jnp.bfloat16 for s in jax.tree.leaves(shapes))


def test_70b_forward_lowers_and_compiles_with_scan():
    cfg = preset("llama2_70b")
    assert cfg.scan_layers and cfg.remat != "none"
    shapes = jax.eval_shape(lambda k: llama.init_params(k, cfg, jnp.bfloat16), jax.random.key(0))
    tokens = jax.ShapeDtypeStruct((1, 64), jnp.int32)
    compiled = jax.jit(llama.forward, static_argnums=2).lower(shapes, tokens, cfg).compile()
    out = compiled.out_info
    assert out.shape == (1, 64, cfg.vocab_size)


@pytest.fixture(scope="module")
def tiny():
    cfg = preset("tiny")
    params = llama.init_params(jax.random.key(0), cfg)
    tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, cfg.vocab_size)
    return cfg, params, tokens


def test_causal_future_tokens_do_not_change_past_logits(tiny):
    cfg, params, tokens = tiny
    changed = tokens.at[:, 12:].set((tokens[:, 12:] + 7) % cfg.vocab_size)
    a = llama.forward(params, tokens, cfg)
    b = llama.forward(params, changed, cfg)
    np.testing.assert_allclose(a[:, :12], b[:, :12], atol=1e-6)
    assert not np.allclose(a[:, 12:], b[:, 12:])


def test_scan_and_loop_and_remat_agree(tiny):
    cfg, params, tokens = tiny
    ref = llama.forward(params, tokens, cfg)
    for scan, remat in [(True, "none"), (True, "full"), (False, "dots")]:
        out = llama.forward(params, tokens, cfg.replace(scan_layers=scan, remat=remat))
        np.testing.assert_allclose(out, ref, atol=1e-5)


def test_segments_isolate_packed_documents(tiny):
    cfg, params, tokens = tiny
    # Two documents packed in one row must give the logits of each document alone.
    seg = jnp.asarray([[1] * 10 + [2] * 14] * 2)
    pos = jnp.asarray([list(range(10)) + list(range(14))] * 2)
    packed = llama.forward(params, tokens, cfg, positions=pos, segment_ids=seg)
    first = llama.forward(params, tokens[:, :10], cfg)
    second = llama.forward(params, tokens[:, 10:], cfg)
    np.testing.assert_allclose(packed[:, :10], first, atol=1e-5)
    np.testing.assert_allclose(packed[:, 10:], second, atol=1e-5)


def test_masks_equal_zeroed_weights(tiny):
    cfg, params, tokens = tiny
    masks = masks_lib.dense_masks(params)
    rng = np.random.default_rng(0)
    masks = jax.tree.map(lambda m: jnp.asarray(rng.random(m.shape) > 0.5) if m.ndim else m, masks)
    zeroed = jax.tree.map(lambda w, m: w * m, params, masks)
    np.testing.assert_allclose(llama.forward(params, tokens, cfg, masks),
                               llama.forward(zeroed, tokens, cfg), atol=1e-6)
    masks_lib.check_masks(params, masks)


def test_neuron_subset_equals_zeroing_the_other_neurons(tiny):
    cfg, params, tokens = tiny
    keep = jnp.stack([jnp.arange(0, cfg.intermediate_size, 2)] * cfg.num_layers)
    out = llama.forward(params, tokens, cfg, neuron_idx=keep)
    drop = jnp.ones(cfg.intermediate_size, bool).at[keep[0]].set(False)
    down = params["layers"]["mlp"]["down_proj"] * ~drop[None, :, None]
    zeroed = {**params, "layers": {**params["layers"],
                                   "mlp": {**params["layers"]["mlp"], "down_proj": down}}}
    np.testing.assert_allclose(out, llama.forward(zeroed, tokens, cfg), atol=1e-5)


def test_head_subset_equals_zeroing_the_other_heads(tiny):
    cfg, params, tokens = tiny
    keep = jnp.asarray([[0, 3]] * cfg.num_layers)  # heads 0 and 3: kv groups 0 and 1
    out = llama.forward(params, tokens, cfg, head_idx=keep)
    e = cfg.dim_per_head
    rows = np.zeros(cfg.q_width, bool)
    for h in (0, 3):
        rows[h * e:(h + 1) * e] = True
    o = params["layers"]["self_attn"]["o_proj"] * rows[None, :, None]
    zeroed = {**params, "layers": {**params["layers"],
                                   "self_attn": {**params["layers"]["self_attn"], "o_proj": o}}}
    np.testing.assert_allclose(out, llama.forward(zeroed, tokens, cfg), atol=1e-5)


def test_bfloat16_params_and_compute_close_to_float32(tiny):
    cfg, params, tokens = tiny
    ref = llama.forward(params, tokens, cfg)
    p16 = jax.tree.map(lambda w: w.astype(jnp.bfloat16), params)
    out = llama.forward(p16, tokens, cfg.replace(dtype="bfloat16"))
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref, atol=0.05)


def test_hidden_states_are_block_outputs(tiny):
    """Each hidden state is the previous one through its block; the logits read the last.

    transformers' output_hidden_states is the independent reference (test_hf_parity.py); this
    checks the same chain without torch, with the scanned and the unrolled forward. Fails if
    the stack is shifted by one (block inputs instead of outputs) or the layers permuted.
    """
    cfg, params, tokens = tiny
    for scan in (True, False):
        c = cfg.replace(scan_layers=scan)
        logits, hidden = llama.forward(params, tokens, c, return_hidden=True)
        assert hidden.shape == (cfg.num_layers, *tokens.shape, cfg.hidden_size)
        cos, sin, mask = llama.rope_and_mask(tokens.shape, c)
        x = llama.embed(params, tokens, c)
        for i in range(cfg.num_layers):
            x = llama.block(llama.layer_params(params, i), x, cos, sin, mask, c)[0]
            np.testing.assert_allclose(hidden[i], x, atol=1e-5)
        normed = layers.rms_norm(hidden[-1], params["norm"], cfg.rms_norm_eps)
        np.testing.assert_allclose(normed @ llama.output_weights(params), logits, atol=1e-4)


def test_layer_view_round_trip(tiny):
    _, params, _ = tiny
    block = jax.tree.map(lambda w: w + 1, llama.layer_params(params, 0))
    new = llama.set_layer_params(params, 0, block)
    np.testing.assert_array_equal(new["layers"]["mlp"]["up_proj"][0],
                                  params["layers"]["mlp"]["up_proj"][0] + 1)
    np.testing.assert_array_equal(new["layers"]["mlp"]["up_proj"][1],
                                  params["layers"]["mlp"]["up_proj"][1])


@pytest.mark.parametrize("changes, message", [
    ({"num_heads": 6, "num_kv_heads": 4}, "multiple of num_kv_heads"),
    ({"hidden_size": 50, "num_heads": 4, "num_kv_heads": 4}, "set head_dim"),
    ({"dtype": "float64"}, "dtype must be"),
    ({"remat": "sometimes"}, "remat must be"),
    ({"vocab_size": 0}, "vocab_size must be positive"),
])
def test_config_errors_name_the_problem(changes, message):
    with pytest.raises(ValueError, match=message):
        PRESETS["tiny"].replace(**changes)


def test_unknown_preset_lists_choices():
    with pytest.raises(ValueError, match="llama2_7b"):
        preset("llama9")


def test_masks_shape_mismatch_is_named(tiny):
    _, params, _ = tiny
    masks = masks_lib.dense_masks(params)
    masks["layers"]["mlp"]["up_proj"] = jnp.ones((3, 3), bool)
    with pytest.raises(ValueError, match="layers/mlp/up_proj"):
        masks_lib.check_masks(params, masks)
