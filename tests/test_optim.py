"""The dense optimizer factory: schedule shape, weight-decay mask, clipping."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from configs import blocks
from sparse_llama.model import llama
from sparse_llama.model.config import preset
from sparse_llama.optim import factory


def opt_cfg(**changes):
    cfg = blocks.optimizer(lr=1e-2)
    cfg.warmup_steps = 10
    cfg.min_lr_ratio = 0.1
    cfg.update(changes)
    return cfg


def test_schedule_warms_up_linearly_then_decays_to_the_floor():
    schedule = factory.learning_rate_schedule(opt_cfg(), total_steps=110)
    lr = np.array([float(schedule(s)) for s in range(130)])
    np.testing.assert_allclose(lr[:10], 1e-2 * np.arange(1, 11) / 10, rtol=1e-6)
    assert lr[0] > 0  # the first update is not wasted
    np.testing.assert_allclose(lr[10], 1e-2, rtol=1e-6)  # the peak, then cosine
    assert np.all(np.diff(lr[10:111]) <= 1e-9)
    np.testing.assert_allclose(lr[60], 1e-2 * (0.1 + 0.9 * 0.5), rtol=1e-5)  # half-way
    np.testing.assert_allclose(lr[110:], 1e-3, rtol=1e-5)  # floor, flat afterwards


def test_schedule_without_warmup_starts_at_the_peak():
    schedule = factory.learning_rate_schedule(opt_cfg(warmup_steps=0), total_steps=50)
    np.testing.assert_allclose(float(schedule(0)), 1e-2, rtol=1e-6)


def test_weight_decay_skips_norms_only():
    params = jax.eval_shape(lambda k: llama.init_params(k, preset("tiny")), jax.random.key(0))
    mask = factory.weight_decay_mask(params)
    assert mask["layers"]["input_layernorm"] is False
    assert mask["layers"]["post_attention_layernorm"] is False
    assert mask["norm"] is False
    assert mask["embed_tokens"] is True and mask["lm_head"] is True
    assert mask["layers"]["mlp"]["down_proj"] is True


def test_zero_gradients_decay_matrices_but_not_norms():
    params = {"embed_tokens": jnp.full((8, 4), 2.0), "norm": jnp.ones((4,)),
              "layers": {"input_layernorm": jnp.ones((2, 4))}}
    opt, _ = factory.make_optimizer(opt_cfg(weight_decay=0.5, warmup_steps=0), total_steps=10)
    state = opt.init(params)
    grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = opt.update(grads, state, params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(new["norm"], params["norm"])
    np.testing.assert_array_equal(new["layers"]["input_layernorm"],
                                  params["layers"]["input_layernorm"])
    np.testing.assert_allclose(new["embed_tokens"], params["embed_tokens"] * (1 - 0.5 * 1e-2),
                               rtol=1e-6)


def test_clipping_bounds_the_update_of_a_huge_gradient():
    params = {"w": jnp.zeros((4,)), "norm": jnp.ones((4,))}
    opt, _ = factory.make_optimizer(opt_cfg(clip_norm=1.0, warmup_steps=0, b1=0.0,
                                            weight_decay=0.0), total_steps=10)
    state = opt.init(params)
    grads = {"w": jnp.full((4,), 1e6), "norm": jnp.zeros((4,))}
    updates, _ = opt.update(grads, state, params)
    np.testing.assert_allclose(updates["w"], -1e-2, rtol=1e-4)  # Adam: |update| = lr
    clipped, _ = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
    assert abs(float(optax.tree.norm(clipped)) - 1.0) < 1e-5
    no_clip, _ = factory.make_optimizer(opt_cfg(clip_norm=0.0), total_steps=10)
    assert len(no_clip.init(params)) == 1  # clip_norm=0: no clipping transform at all
