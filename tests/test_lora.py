"""Mask-preserving LoRA: merge keeps exact zeros, only adapters train, rank checks, files."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from batches import random_batch

from sparse_llama.adapters import objective as adapters_lib
from sparse_llama.ground.tree_paths import get_path, path_name
from sparse_llama.model import llama, lora
from sparse_llama.model import loss as loss_lib
from sparse_llama.model.config import preset
from sparse_llama.sparsity.masks import masks_from_zeros
from sparse_llama.train import state as state_lib
from sparse_llama.train.objective import Objective, lm_objective
from sparse_llama.train.step import make_train_step

CFG = preset("tiny").replace(vocab_size=64, max_position_embeddings=32)


@pytest.fixture(scope="module")
def sparse_base():
    params = llama.init_params(jax.random.key(0), CFG)
    rng = np.random.default_rng(0)

    def prune(path, w):
        if lora.is_target(path_name(path)):
            return jnp.asarray(np.where(rng.random(w.shape) < 0.7, 0.0, np.asarray(w)), w.dtype)
        return w
    params = jax.tree_util.tree_map_with_path(prune, params)
    return params, masks_from_zeros(params)


def random_adapters(params, rank, seed=1):
    adapters = lora.init_adapters(jax.random.key(seed), params, rank)
    # Nonzero b, so the delta is dense everywhere (worst case for the zeros).
    return jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(seed + 1), x.shape),
                        adapters)


def test_merge_is_w_plus_masked_low_rank_and_keeps_exact_zeros(sparse_base):
    params, masks = sparse_base
    adapters = random_adapters(params, 4)
    merged = jax.jit(lora.merge, static_argnums=3)(params, adapters, masks, 0.5)
    flat_p = dict((path_name(p), np.asarray(w)) for p, w in
                  jax.tree_util.tree_flatten_with_path(params)[0])
    flat_m = dict((path_name(p), np.asarray(w)) for p, w in
                  jax.tree_util.tree_flatten_with_path(merged)[0])
    for name, w in flat_p.items():
        if not lora.is_target(name):
            np.testing.assert_array_equal(flat_m[name], w)
            continue
        ad = get_path(adapters, tuple(name.split("/")))
        a, b = np.asarray(ad["a"], np.float64), np.asarray(ad["b"], np.float64)
        want = w + 0.5 * np.einsum("lir,lro->lio", a, b) * (w != 0)
        np.testing.assert_allclose(flat_m[name], want, rtol=1e-5, atol=1e-6)
        assert np.array_equal(flat_m[name] == 0, w == 0), name  # exactly the base's zeros
        assert np.all(np.signbit(flat_m[name][w == 0]) == np.signbit(w[w == 0]))
    # The dense merge (what other tools write) would fill the zeros in.
    dense = lora.merge(params, adapters, None, 0.5)
    q = np.asarray(dense["layers"]["self_attn"]["q_proj"])
    assert np.mean(q == 0) < 0.01


def test_rank_larger_than_a_layer_is_refused(sparse_base):
    params, _ = sparse_base
    width = CFG.kv_width  # k_proj / v_proj: (D, K*E), the narrowest target
    lora.check_rank(params, min(CFG.hidden_size, width))
    with pytest.raises(ValueError, match=r"lora_rank=1000 is larger than layers/.*'s width"):
        lora.init_adapters(jax.random.key(0), params, 1000)
    with pytest.raises(ValueError, match="positive integer"):
        lora.check_rank(params, 0)


def make_batch(b=4, t=16, seed=0):
    return random_batch(CFG.vocab_size, b, t, seed)


def test_training_moves_only_the_adapters_and_starts_at_the_base(sparse_base):
    params, masks = sparse_base
    before = jax.tree.map(np.array, params)
    adapters = lora.init_adapters(jax.random.key(3), params, 2)
    optimizer = optax.adam(1e-2)
    obj = Objective(loss=adapters_lib.lora_loss(lm_objective(CFG).loss, 1.0),
                    inputs=(params, masks, None))
    step = make_train_step(CFG, optimizer, optax.constant_schedule(1e-2), objective=obj)
    state = state_lib.create(adapters, optimizer, seed=0)
    batch = make_batch()
    state, m0 = step(state, batch, (params, masks, None))
    base_total, base_count = jax.jit(loss_lib.lm_loss, static_argnums=2)(params, batch, CFG)
    np.testing.assert_allclose(float(m0["loss"]), float(base_total / base_count), rtol=1e-5)
    for _ in range(3):
        state, m = step(state, batch, (params, masks, None))
    assert float(m["loss"]) < float(m0["loss"])
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))  # the base is frozen
    b_q = np.asarray(state.params["layers"]["self_attn"]["q_proj"]["b"])
    assert np.abs(b_q).max() > 0
    merged = lora.merge(params, state.params, masks, 1.0)
    q, q0 = (np.asarray(t["layers"]["self_attn"]["q_proj"]) for t in (merged, params))
    assert np.array_equal(q == 0, q0 == 0)


def test_adapters_alone_round_trip_through_safetensors(sparse_base, tmp_path):
    params, _ = sparse_base
    adapters = random_adapters(params, 3)
    path = lora.save_adapters(adapters, tmp_path / "adapters.safetensors", rank=3, alpha=6.0)
    loaded, rank, alpha = lora.load_adapters(path)
    assert (rank, alpha) == (3, 6.0)
    assert jax.tree.structure(loaded) == jax.tree.structure(adapters)
    for a, b in zip(jax.tree.leaves(adapters), jax.tree.leaves(loaded), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
