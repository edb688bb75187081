"""Distillation: KD and SquareHead against numpy transcriptions, the objective on the step."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import blocks
from sparse_llama.distill import losses
from sparse_llama.distill import objective as distill
from sparse_llama.model import llama
from sparse_llama.model import loss as loss_lib
from sparse_llama.model.config import preset
from sparse_llama.train import state as state_lib
from sparse_llama.train.step import _split_micro, make_train_step

CFG = preset("tiny").replace(vocab_size=64, max_position_embeddings=32)
_FORWARD = jax.jit(llama.forward, static_argnames=("config", "return_hidden"))


def hidden_forward(params, batch):
    """(logits, hidden) of a batch, jitted (eager dispatch would dominate the tests)."""
    return _FORWARD(params, batch["inputs"], config=CFG, positions=batch["positions"],
                    segment_ids=batch["segment_ids"], return_hidden=True)


def np_log_softmax(z):
    z = np.asarray(z, np.float64)
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def np_kd(zs, zt, w, tau):
    """sum_t w_t tau^2 sum_v p_T (log p_T - log p_S), and sum_t w_t."""
    lt, ls = np_log_softmax(zt / tau), np_log_softmax(zs / tau)
    per_token = tau ** 2 * (np.exp(lt) * (lt - ls)).sum(-1)
    w = np.asarray(w, np.float64)
    return (per_token * w).sum(), w.sum()


def np_squarehead(hs, ht, w):
    hs, ht, w = (np.asarray(a, np.float64) for a in (hs, ht, w))
    ratios = []
    for layer in range(hs.shape[0]):
        num = den = 0.0
        for b in range(w.shape[0]):
            for t in range(w.shape[1]):
                if w[b, t] > 0:
                    num += w[b, t] * np.sum((ht[layer, b, t] - hs[layer, b, t]) ** 2)
                    den += w[b, t] * np.sum(ht[layer, b, t] ** 2)
        ratios.append(num / den)
    return float(np.mean(ratios))


def test_kd_matches_numpy_with_temperature_and_token_mask():
    rng = np.random.default_rng(0)
    zs, zt = rng.normal(0, 3, (2, 2, 5, 11)).astype(np.float32)
    w = np.array([[1, 1, 0, 1, 0.5], [0, 1, 1, 1, 0]], np.float32)
    for tau in (1.0, 2.0, 0.5):
        total, count = losses.kd_sums(jnp.asarray(zs), jnp.asarray(zt), jnp.asarray(w), tau)
        want, want_count = np_kd(zs, zt, w, tau)
        np.testing.assert_allclose(float(total), want, rtol=2e-5)
        assert float(count) == want_count
    # What masked positions hold does not matter, not even inf.
    bad = zs.copy()
    bad[0, 2] = np.inf
    bad[1, 0] = rng.normal(size=11)
    total2, _ = losses.kd_sums(jnp.asarray(bad), jnp.asarray(zt), jnp.asarray(w), 2.0)
    np.testing.assert_allclose(float(total2), np_kd(zs, zt, w, 2.0)[0], rtol=2e-5)
    # The student matching the teacher costs nothing.
    same, _ = losses.kd_sums(jnp.asarray(zt), jnp.asarray(zt), jnp.asarray(w), 2.0)
    assert abs(float(same)) < 1e-5


def test_squarehead_matches_numpy_on_random_hidden_states():
    rng = np.random.default_rng(1)
    hs, ht = rng.normal(size=(2, 3, 2, 4, 6)).astype(np.float32)
    w = np.array([[1, 0, 1, 1], [1, 1, 0, 0]], np.float32)
    got = float(losses.squarehead(jnp.asarray(hs), jnp.asarray(ht), jnp.asarray(w)))
    np.testing.assert_allclose(got, np_squarehead(hs, ht, w), rtol=1e-5)
    # Masked tokens change neither the numerator nor the teacher's normaliser.
    hs2, ht2 = hs.copy(), ht.copy()
    hs2[:, 0, 1] += 100.0
    ht2[:, 1, 3] *= 50.0
    got2 = float(losses.squarehead(jnp.asarray(hs2), jnp.asarray(ht2), jnp.asarray(w)))
    np.testing.assert_allclose(got2, got, rtol=1e-6)
    # An all-padding batch is 0, not NaN; a perfect student is 0.
    zero_w = jnp.zeros_like(jnp.asarray(w))
    assert float(losses.squarehead(jnp.asarray(hs), jnp.asarray(ht), zero_w)) == 0.0
    assert float(losses.squarehead(jnp.asarray(ht), jnp.asarray(ht), jnp.asarray(w))) == 0.0


def make_batch(b=8, t=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, CFG.vocab_size, (b, t + 1)).astype(np.int32)
    seg = np.ones((b, t), np.int32)
    seg[:, t // 2:] = 2
    pos = np.concatenate([np.arange(t // 2), np.arange(t - t // 2)]).astype(np.int32)
    mask = np.ones((b, t), np.float32)
    mask[0, -3:] = 0
    mask[1, :5] = 0  # a "prompt" that is not trained
    mask[3, :] = 0
    return {"inputs": jnp.asarray(x[:, :-1]), "targets": jnp.asarray(x[:, 1:]),
            "segment_ids": jnp.asarray(seg), "positions": jnp.asarray(np.broadcast_to(pos, (b, t))),
            "loss_mask": jnp.asarray(mask)}


@pytest.fixture(scope="module")
def models():
    teacher = llama.init_params(jax.random.key(0), CFG)
    noise = llama.init_params(jax.random.key(1), CFG)
    student = jax.tree.map(lambda a, n: a + 0.5 * n, teacher, noise)
    return student, teacher


def loss_fn(**weights):
    kw = {"ce_weight": 1.0, "kd_weight": 1.0, "layer_weight": 1.0, "temperature": 2.0,
          **weights}
    return distill.distill_loss(CFG, CFG, **kw)


def test_loss_terms_match_their_parts(models):
    student, teacher = models
    batch = make_batch()
    loss = jax.jit(loss_fn(ce_weight=0.3, kd_weight=0.7, layer_weight=2.0))
    total, n, terms = loss(student, batch, None, teacher, {})
    ce_sum, count = jax.jit(loss_lib.lm_loss, static_argnums=2)(student, batch, CFG)
    w = np.asarray(batch["loss_mask"])
    zs, hs = hidden_forward(student, batch)
    zt, ht = hidden_forward(teacher, batch)
    kd, _ = np_kd(np.asarray(zs), np.asarray(zt), w, 2.0)
    sh = np_squarehead(np.asarray(hs), np.asarray(ht), w)
    assert float(n) == float(count) == w.sum()
    np.testing.assert_allclose(float(terms["ce"][0]), float(ce_sum), rtol=1e-5)
    np.testing.assert_allclose(float(terms["kd"][0]), kd, rtol=1e-4)
    np.testing.assert_allclose(float(terms["squarehead"][0]), sh * w.sum(), rtol=1e-4)
    np.testing.assert_allclose(float(total), 0.3 * float(ce_sum) + 0.7 * kd + 2.0 * sh * w.sum(),
                               rtol=1e-4)


def _overflowing(teacher):
    """The teacher with an overflowed (infinite) lm_head: its logits are not finite, so its
    KD is not either (its hidden states, which SquareHead reads, are unchanged)."""
    return dict(teacher, lm_head=teacher["lm_head"] * jnp.inf)


def _counting_forward(monkeypatch) -> list:
    """Patch llama.forward to record every call (a trace counts once per forward)."""
    calls, real = [], llama.forward

    def forward(params, tokens, config, **kwargs):
        calls.append(config)
        return real(params, tokens, config, **kwargs)
    monkeypatch.setattr(llama, "forward", forward)
    return calls


def test_a_zero_kd_weight_keeps_kd_out_of_the_loss_and_a_useless_teacher_unrun(models,
                                                                                monkeypatch):
    student, teacher = models
    bad, batch = _overflowing(teacher), make_batch()
    total, _, terms = jax.jit(loss_fn(layer_weight=0.0))(student, batch, None, bad, {})
    # The setup, and catches a KD that hides a broken teacher as 0 (a NaN teacher probability
    # taken for an exact 0).
    assert not np.isfinite(float(terms["kd"][0])) and not np.isfinite(float(total))
    # Catches: 0 * KD in the loss (0 * inf = NaN): with kd_weight=0 a non-finite KD (or its
    # gradient) must not reach the loss, the reported terms or the student's gradients.
    loss = loss_fn(ce_weight=0.5, kd_weight=0.0, layer_weight=2.0)
    total, n, terms = jax.jit(loss)(student, batch, None, bad, {})
    assert set(terms) == {"ce", "squarehead"}
    np.testing.assert_allclose(float(total), 0.5 * float(terms["ce"][0])
                               + 2.0 * float(terms["squarehead"][0]), rtol=1e-6)
    grads = jax.jit(jax.grad(lambda p: loss(p, batch, None, bad, {})[0]))(student)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    # Catches: the teacher's forward traced (and run) when no term reads it.
    calls = _counting_forward(monkeypatch)
    jax.make_jaxpr(loss_fn(kd_weight=0.0, layer_weight=2.0))(student, batch, None, teacher, {})
    assert len(calls) == 2  # the student and the teacher (SquareHead reads its hidden states)
    calls.clear()
    ce_only = loss_fn(kd_weight=0.0, layer_weight=0.0)
    jax.make_jaxpr(ce_only)(student, batch, None, teacher, {})
    assert len(calls) == 1
    total, n, terms = ce_only(student, batch, None, None, {})  # no teacher at all
    ce_sum, count = jax.jit(loss_lib.lm_loss, static_argnums=2)(student, batch, CFG)
    assert set(terms) == {"ce"} and float(n) == float(count)
    np.testing.assert_allclose(float(total), float(ce_sum), rtol=1e-6)


def test_teacher_gets_no_gradient(models):
    student, teacher = models
    batch = make_batch()
    loss = loss_fn()
    g_teacher = jax.jit(jax.grad(lambda t: loss(student, batch, None, t, {})[0]))(teacher)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(g_teacher))
    g_student = jax.jit(jax.grad(lambda p: loss(p, batch, None, teacher, {})[0]))(student)
    assert float(max(jnp.abs(g).max() for g in jax.tree.leaves(g_student))) > 0


def _optimizer():
    """Plain SGD at rate 1: the update is minus the gradient, so comparing params after one
    step compares gradients (Adam's first step would amplify rounding of tiny gradients)."""
    return optax.sgd(1.0), optax.constant_schedule(1.0)


def _run(models, grad_accum, **weights):
    student, teacher = models
    optimizer, schedule = _optimizer()
    obj = distill.Objective(loss=loss_fn(**weights), inputs=teacher)
    step = make_train_step(CFG, optimizer, schedule, grad_accum=grad_accum, objective=obj)
    state = state_lib.create(jax.tree.map(jnp.copy, student), optimizer, seed=0)
    state, metrics = step(state, make_batch(), teacher)
    return state, jax.device_get(metrics)


def test_step_leaves_the_teacher_unchanged(models):
    _, teacher = models
    before = jax.tree.map(np.array, teacher)
    state, metrics = _run(models, 1)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(teacher), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))  # not donated, not updated
    assert {"ce", "kd", "squarehead"} <= set(metrics)
    moved = jax.tree.map(lambda p, t: float(jnp.abs(p - t).max()), state.params, teacher)
    assert max(jax.tree.leaves(moved)) > 0


def test_ce_and_kd_are_exact_under_gradient_accumulation(models):
    one_state, one = _run(models, 1, layer_weight=0.0)
    four_state, four = _run(models, 4, layer_weight=0.0)
    for key in ("loss", "ce", "kd", "tokens"):
        np.testing.assert_allclose(four[key], one[key], rtol=1e-5)
    np.testing.assert_allclose(four["grad_norm"], one["grad_norm"], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(one_state.params), jax.tree.leaves(four_state.params),
                    strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)


def test_squarehead_is_token_weighted_over_micro_batches(models):
    """With k micro-batches the loss holds layer_weight * sum_i n_i sh_i / sum_i n_i, sh_i
    normalised within micro-batch i (docs/distill.md)."""
    student, teacher = models
    _, metrics = _run(models, 2, ce_weight=0.0, kd_weight=0.0, layer_weight=3.0)
    micro = _split_micro(make_batch(), 2)
    sums = counts = 0.0
    for i in range(2):
        mb = jax.tree.map(lambda x, i=i: x[i], micro)
        _, hs = hidden_forward(student, mb)
        _, ht = hidden_forward(teacher, mb)
        n = float(np.asarray(mb["loss_mask"]).sum())
        sums += n * np_squarehead(np.asarray(hs), np.asarray(ht), np.asarray(mb["loss_mask"]))
        counts += n
    np.testing.assert_allclose(metrics["squarehead"], sums / counts, rtol=1e-4)
    np.testing.assert_allclose(metrics["loss"], 3.0 * sums / counts, rtol=1e-4)


def test_teacher_of_another_vocabulary_or_depth_is_refused():
    other = CFG.replace(vocab_size=65)
    with pytest.raises(ValueError, match="vocabulary of 65 ids but the student has 64"):
        distill.check_teacher(CFG, other, layer_weight=0.0)
    deeper = CFG.replace(num_layers=3)
    distill.check_teacher(CFG, deeper, layer_weight=0.0)  # logit KD alone needs no pairing
    with pytest.raises(ValueError, match="distill.layer_weight=0"):
        distill.check_teacher(CFG, deeper, layer_weight=1.0)


def test_bad_distill_sections_are_refused(tmp_path):
    config = ml_collections.ConfigDict({"model": blocks.model()})
    with pytest.raises(ValueError, match="needs a distill section"):
        distill.check_distill_config(config)
    config.distill = blocks.distill()
    with pytest.raises(ValueError, match="teacher_path is empty"):
        distill.check_distill_config(config)
    (tmp_path / "config.json").write_text("{}")
    config.distill.teacher_path = str(tmp_path)
    config.distill.temperature = 0.0
    with pytest.raises(ValueError, match="temperature must be > 0"):
        distill.check_distill_config(config)
    config.distill.update(temperature=1.0, ce_weight=0.0, kd_weight=0.0, layer_weight=0.0)
    with pytest.raises(ValueError, match="all 0"):
        distill.check_distill_config(config)
    config.distill.tau = 2.0  # a key the section does not have: named with the allowed ones
    with pytest.raises(ValueError, match=r"distill has no key 'tau'; the keys of distill are"):
        distill.check_distill_config(config)
