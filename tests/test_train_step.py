"""The loss, the jitted train step (donation, accumulation, mixed precision) and eval step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import blocks
from sparse_llama.model import llama, sharding
from sparse_llama.model import loss as loss_lib
from sparse_llama.model.config import preset
from sparse_llama.optim.factory import make_optimizer
from sparse_llama.train import state as state_lib
from sparse_llama.train.objective import Objective
from sparse_llama.train.step import make_eval_step, make_train_step

CFG = preset("tiny").replace(vocab_size=64, max_position_embeddings=32)


def make_batch(b=8, t=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, CFG.vocab_size, (b, t + 1)).astype(np.int32)
    seg = np.ones((b, t), np.int32)
    seg[:, t // 2:] = 2  # two packed documents per row
    pos = np.concatenate([np.arange(t // 2), np.arange(t - t // 2)]).astype(np.int32)
    mask = np.ones((b, t), np.float32)
    mask[0, -3:] = 0  # padding at the end of row 0
    batch = {"inputs": x[:, :-1], "targets": x[:, 1:], "segment_ids": seg,
             "positions": np.broadcast_to(pos, (b, t)), "loss_mask": mask}
    return {k: jnp.asarray(v) for k, v in batch.items()}


@pytest.fixture(scope="module")
def base_params():
    return llama.init_params(jax.random.key(0), CFG)


@pytest.fixture
def params(base_params):
    """A fresh copy per test: donating steps delete the arrays they are given."""
    return jax.tree.map(jnp.copy, base_params)


def optimizer():
    cfg = blocks.optimizer(lr=1e-2)
    cfg.warmup_steps = 0
    return make_optimizer(cfg, total_steps=10)


OPT, SCHEDULE = optimizer()


@pytest.fixture(scope="module")
def f32_step():
    """One compiled float32 step shared by the tests (compiles dominate their time)."""
    return make_train_step(CFG, OPT, SCHEDULE)


def test_loss_is_masked_token_cross_entropy(params):
    batch = make_batch()
    loss_fn = jax.jit(loss_lib.lm_loss, static_argnums=2)
    total, count = loss_fn(params, batch, CFG)
    logits = np.asarray(jax.jit(llama.forward, static_argnums=2)(
        params, batch["inputs"], CFG, positions=batch["positions"],
        segment_ids=batch["segment_ids"]), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                           keepdims=True)) - logits.max(-1, keepdims=True)
    nll = -np.take_along_axis(logp, np.asarray(batch["targets"])[..., None], -1)[..., 0]
    mask = np.asarray(batch["loss_mask"])
    np.testing.assert_allclose(float(total), (nll * mask).sum(), rtol=1e-5)
    assert float(count) == mask.sum()
    # What masked positions hold does not matter.
    other = dict(batch, targets=batch["targets"].at[0, -3:].add(1) % CFG.vocab_size)
    assert float(loss_fn(params, other, CFG)[0]) == float(total)


def test_step_donates_state_and_reports_metrics(params, f32_step):
    state = state_lib.create(params, OPT, seed=0)
    step = f32_step
    old_leaf = state.params["norm"]
    new_state, metrics = step(state, make_batch())
    assert old_leaf.is_deleted()  # donated: updated in place
    assert int(new_state.step) == 1
    assert set(metrics) == {"loss", "tokens", "grad_norm", "lr", "param_norm"}
    assert float(metrics["lr"]) == pytest.approx(1e-2)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["tokens"]) == 8 * 16 - 3


def _uneven_batch():
    """make_batch with micro-batch 0 (rows 0-1 of 4 x 2) mostly padding: 10 tokens vs 32."""
    batch = make_batch()
    mask = np.asarray(batch["loss_mask"]).copy()
    mask[0, 4:] = 0
    mask[1, 6:] = 0
    return dict(batch, loss_mask=jnp.asarray(mask))


def test_gradient_accumulation_matches_one_big_batch(params):
    """With SGD at lr 1 the update is minus the gradient, linear in it; the reference is
    jax.grad of the whole batch's mean token loss, computed in one piece.

    Adam's first step moves every weight by about lr * sign(g), whatever the gradient's scale,
    so it hid a mis-scaled accumulation. This fails if micro-batches are weighted equally
    instead of by their tokens (micro-batch 0 has 10 tokens, the others 32), if their sums
    are not divided by the total count, or if a micro-batch is dropped or counted twice.
    """
    batch = _uneven_batch()
    sgd, schedule = optax.sgd(1.0), optax.constant_schedule(1.0)

    def mean_loss(p):
        total, count = loss_lib.lm_loss(p, batch, CFG)
        return total / count

    want = jax.grad(mean_loss)(params)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(want))
    for k in (1, 4):
        step = make_train_step(CFG, sgd, schedule, grad_accum=k)
        state = state_lib.create(jax.tree.map(jnp.copy, params), sgd, seed=0)
        new_state, metrics = step(state, batch)
        got = jax.tree.map(lambda new, old: old - new, new_state.params, params)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            # float32 rounding of w - g relative to the weights (~1e-7 * |w| ~ 1e-8) is far
            # below 1e-4 of the largest gradient entry; an equal weighting is off by ~10%.
            np.testing.assert_allclose(g, w, rtol=0, atol=1e-4 * scale)
        np.testing.assert_allclose(metrics["loss"], mean_loss(params), rtol=1e-5)
        assert float(metrics["tokens"]) == float(np.asarray(batch["loss_mask"]).sum())


def test_bf16_compute_keeps_float32_master_weights(params, f32_step):
    batch = make_batch()
    losses = {}
    for dtype in ("float32", "bfloat16"):
        cfg = CFG.replace(dtype=dtype)
        step = f32_step if dtype == "float32" else make_train_step(cfg, OPT, SCHEDULE)
        state = state_lib.create(jax.tree.map(jnp.copy, params), OPT, seed=0)
        new_state, metrics = step(state, batch)
        assert all(w.dtype == jnp.float32 for w in jax.tree.leaves(new_state.params))
        assert all(m.dtype == jnp.float32 for m in jax.tree.leaves(new_state.opt_state[1][0].mu))
        losses[dtype] = float(metrics["loss"])
    assert losses["bfloat16"] == pytest.approx(losses["float32"], abs=0.05)


def test_custom_loss_gets_a_per_step_key(params):
    opt, schedule = optimizer()

    def loss(p, batch, rng, inputs, step_args):
        return jnp.sum(p["norm"]) * 0 + jax.random.uniform(rng), jnp.ones(()), {}

    state = state_lib.create(params, opt, seed=3)
    base = np.asarray(state.rng)  # the step donates state.rng
    step = make_train_step(CFG, opt, schedule, objective=Objective(loss=loss))
    for i in range(2):
        state, metrics = step(state, make_batch())
        expected = jax.random.uniform(jax.random.fold_in(base, i))
        assert float(metrics["loss"]) == pytest.approx(float(expected))


def test_sharded_step_and_eval_step_agree_with_the_loss(params):
    mc = blocks.mesh()
    mesh, rules = sharding.make_mesh(mc), sharding.rules_from_config(mc)
    opt, schedule = optimizer()
    batch = make_batch()
    bsh = sharding.batch_sharding(mesh, rules)
    state = state_lib.state_from_params(params, opt, mesh, rules, seed=0)
    shardings = jax.tree.map(lambda a: a.sharding, state)
    eval_step = make_eval_step(CFG, param_shardings=shardings.params, batch_sharding=bsh)
    placed = jax.tree.map(lambda x: jax.device_put(x, bsh), batch)
    out = eval_step(state.params, placed)
    total, count = loss_lib.lm_loss(params, batch, CFG)
    np.testing.assert_allclose(out["nll_sum"], total, rtol=1e-5)
    assert float(out["tokens"]) == float(count)
    step = make_train_step(CFG, opt, schedule, state_shardings=shardings, batch_sharding=bsh)
    new_state, metrics = step(state, placed)
    np.testing.assert_allclose(metrics["loss"], total / count, rtol=1e-5)
    assert new_state.params["embed_tokens"].sharding == shardings.params["embed_tokens"]
