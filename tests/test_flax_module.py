"""The Flax Module: init is exactly `init_params`, apply is exactly `forward`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_llama.model import llama
from sparse_llama.model.config import preset
from sparse_llama.model.flax_module import LlamaModule
from sparse_llama.sparsity import masks as masks_lib

CONFIGS = {
    "untied": preset("tiny").replace(vocab_size=64, max_position_embeddings=32),
    "tied_scan": preset("tiny").replace(vocab_size=64, max_position_embeddings=32,
                                        tie_word_embeddings=True, scan_layers=True),
}
TOKENS = jax.random.randint(jax.random.key(9), (2, 12), 0, 64, jnp.int32)
# Jitted on both sides: op-by-op dispatch of a whole forward is slow on a busy CPU, and both
# sides lower the same functions, so their results are still compared bit for bit.
forward = jax.jit(llama.forward, static_argnums=2)
init_params = jax.jit(llama.init_params, static_argnums=(1, 2, 3))


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.shape == y.shape and x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("name, dtype, std", [("untied", jnp.float32, 0.02),
                                              ("tied_scan", jnp.bfloat16, 0.05)])
def test_init_makes_exactly_our_param_tree(name, dtype, std):
    config = CONFIGS[name]
    key = jax.random.key(3)
    init = jax.jit(LlamaModule(config, param_dtype=dtype, init_std=std).init)
    variables = init(key, TOKENS)
    assert set(variables) == {"params"}
    assert_trees_equal(variables["params"], init_params(key, config, dtype, std))
    other = init(jax.random.key(4), TOKENS)["params"]
    assert not np.array_equal(other["embed_tokens"], variables["params"]["embed_tokens"])


@pytest.mark.parametrize("name", CONFIGS)
def test_apply_is_forward_with_masks_and_packing(name):
    config = CONFIGS[name]
    apply = jax.jit(LlamaModule(config).apply)
    # Params that did not come from the module (as from hf_io.load_hf or a checkpoint).
    params = jax.tree.map(lambda w: w + 0.01 * jnp.arange(w.size).reshape(w.shape) % 0.07,
                          llama.init_params(jax.random.key(1), config, init_std=0.2))
    masks = masks_lib.dense_masks(params)
    q = params["layers"]["self_attn"]["q_proj"]
    masks["layers"]["self_attn"]["q_proj"] = jax.random.bernoulli(jax.random.key(2), 0.5, q.shape)
    seg = jnp.asarray([[1] * 6 + [2] * 6] * 2, jnp.int32)  # two packed documents per row
    pos = jnp.asarray([list(range(6)) * 2] * 2, jnp.int32)
    ours = forward(params, TOKENS, config, masks, positions=pos, segment_ids=seg)
    flax_out = apply({"params": params}, TOKENS, masks=masks, positions=pos, segment_ids=seg)
    np.testing.assert_array_equal(np.asarray(flax_out), np.asarray(ours))
    # Each argument really matters here, so an apply that dropped one would fail above.
    assert not np.allclose(forward(params, TOKENS, config, positions=pos, segment_ids=seg),
                           ours, atol=1e-4)
    assert not np.allclose(forward(params, TOKENS, config, masks), ours, atol=1e-4)


def test_apply_under_jit_and_grad_matches_forward():
    config = CONFIGS["untied"]
    module = LlamaModule(config)
    params = llama.init_params(jax.random.key(5), config)

    def loss(fn, p):
        return jnp.mean(fn(p) ** 2)

    g_flax = jax.jit(jax.grad(lambda p: loss(lambda q: module.apply({"params": q}, TOKENS), p)))(
        params)
    g_ours = jax.jit(jax.grad(lambda p: loss(lambda q: llama.forward(q, TOKENS, config), p)))(
        params)
    assert_trees_equal(g_flax, g_ours)


def test_apply_refuses_params_of_another_shape():
    config = CONFIGS["untied"]
    params = llama.init_params(jax.random.key(5), config.replace(hidden_size=32))
    with pytest.raises(Exception, match="embed_tokens"):
        jax.eval_shape(LlamaModule(config).apply, {"params": params}, TOKENS)
