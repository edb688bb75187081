"""keep_sparse: exact zeros, AdamW on masked gradients, extra args, checkpoints, sharding, export.

Each test names, in a comment, the plausible bug it fails on.
"""

import glob

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from batches import random_batch
from safetensors.numpy import load_file

from configs import blocks
from sparse_llama.ground.tree_paths import path_name
from sparse_llama.model import llama, sharding
from sparse_llama.model.config import preset
from sparse_llama.model.loss import lm_loss
from sparse_llama.optim import factory
from sparse_llama.optim.keep_sparse import KeepSparseState, find_masks, keep_sparse, set_masks
from sparse_llama.sparsity import masks as masks_lib
from sparse_llama.train import state as state_lib
from sparse_llama.train.checkpoint import Checkpoints
from sparse_llama.train.export import export_params
from sparse_llama.train.step import make_train_step

CFG = preset("tiny").replace(vocab_size=64, max_position_embeddings=32)
STEPS = 50


def opt_cfg(**changes):
    cfg = blocks.optimizer(lr=1e-3)
    cfg.update({"warmup_steps": 10, "min_lr_ratio": 0.1, "weight_decay": 0.1, "b1": 0.9,
                "b2": 0.95, "eps": 1e-8, "clip_norm": 1.0})
    cfg.update(changes)
    return cfg


def random_masks(params, seed=0, pruned=0.6):
    """~`pruned` of every targeted tensor pruned at random; 0-d True elsewhere."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, w: (jnp.asarray(rng.random(w.shape) >= pruned)
                         if masks_lib.is_target(path_name(path))
                         else jnp.ones((), jnp.bool_)), params)


def sparse_params(seed=0):
    params = llama.init_params(jax.random.key(seed), CFG)
    masks = random_masks(params, seed)
    return masks_lib.apply_masks(params, masks), masks


def named(tree) -> dict:
    """{'layers/mlp/up_proj': leaf, ...} as float64/bool numpy arrays."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {path_name(p): np.asarray(x) for p, x in flat}


def pruned_values(params, masks):
    """Every pruned entry of every leaf, concatenated (empty for dense leaves)."""
    return np.concatenate([np.asarray(w)[~np.broadcast_to(np.asarray(m), w.shape)].ravel()
                           for w, m in zip(jax.tree.leaves(params), jax.tree.leaves(masks),
                                           strict=True)])


def assert_pruned_exactly_zero(params, masks):
    values = pruned_values(params, masks)
    assert values.size > 0
    assert np.all(values == 0.0), f"{np.count_nonzero(values)} pruned weights revived"
    assert not np.any(np.signbit(values)), "pruned weights hold -0.0"


# --- an independent numpy transcription of the optimizer (float64) -------------------------

def np_schedule(step: int, cfg) -> float:
    """Linear warmup from lr/warmup, cosine to lr*min_lr_ratio at STEPS (factory's docstring)."""
    if step < cfg.warmup_steps:
        return cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps)
    progress = min(1.0, max(0.0, (step - cfg.warmup_steps) / (STEPS - cfg.warmup_steps)))
    return cfg.lr * (cfg.min_lr_ratio
                     + (1 - cfg.min_lr_ratio) * 0.5 * (1 + np.cos(np.pi * progress)))


def np_adamw(params: dict, masks: dict, grads_per_step: list[dict], cfg, *, clip_masked=True):
    """AdamW (decoupled decay, bias correction, eps outside the sqrt) on masked gradients with
    global-norm clipping over the masked gradients (or the raw ones: `clip_masked=False`)."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    mu = {k: np.zeros_like(v) for k, v in p.items()}
    nu = {k: np.zeros_like(v) for k, v in p.items()}
    for t, raw in enumerate(grads_per_step):
        g = {k: raw[k].astype(np.float64) * masks[k] for k in p}
        norm_of = g if clip_masked else raw
        norm = np.sqrt(sum(np.sum(np.square(v.astype(np.float64))) for v in norm_of.values()))
        scale = 1.0 if norm < cfg.clip_norm else cfg.clip_norm / norm
        lr = np_schedule(t, cfg)
        for k in p:
            gk = g[k] * scale
            mu[k] = cfg.b1 * mu[k] + (1 - cfg.b1) * gk
            nu[k] = cfg.b2 * nu[k] + (1 - cfg.b2) * gk * gk
            m_hat = mu[k] / (1 - cfg.b1 ** (t + 1))
            v_hat = nu[k] / (1 - cfg.b2 ** (t + 1))
            update = m_hat / (np.sqrt(v_hat) + cfg.eps)
            if "norm" not in k.rsplit("/", 1)[-1]:
                update = update + cfg.weight_decay * p[k]
            p[k] = p[k] - lr * update
    return p, mu, nu


@pytest.fixture(scope="module")
def trajectory():
    """STEPS sparse AdamW updates with random gradients, nonzero at pruned entries too, whose
    masked global norm alternates around the clip norm (some steps clip, some do not)."""
    params, masks = sparse_params()
    # Half of the pruned entries start as -0.0: masks_from_zeros counts them as pruned, and
    # the updates must still leave +0.0 there.
    flip = random_masks(params, seed=7, pruned=0.5)
    params = jax.tree.map(lambda w, m, f: jnp.where(~m & ~f, -0.0, w), params, masks, flip)
    cfg = opt_cfg()
    opt, _ = factory.make_optimizer(cfg, total_steps=STEPS, sparse=True)
    state = opt.init(params)
    np_masks = named(masks)
    rng = np.random.default_rng(1)
    update = jax.jit(opt.update)
    apply = jax.jit(optax.apply_updates)
    grads_per_step, masked_norms = [], []
    new = params
    for t in range(STEPS):
        raw = {k: rng.standard_normal(w.shape).astype(np.float32)
               for k, w in named(params).items()}
        masked = np.sqrt(sum(np.sum((raw[k] * np_masks[k]) ** 2.0) for k in raw))
        target = cfg.clip_norm * (3.0 if t % 2 else 0.4)
        raw = {k: (v * (target / masked)).astype(np.float32) for k, v in raw.items()}
        grads_per_step.append(raw)
        masked_norms.append(target)
        grads = jax.tree.unflatten(jax.tree.structure(params), [raw[k] for k in named(params)])
        updates, state = update(grads, state, new)
        new = apply(new, updates)
    return {"params": params, "masks": masks, "final": new, "state": state, "cfg": cfg,
            "grads": grads_per_step, "masked_norms": masked_norms}


def test_pruned_weights_and_moments_stay_exactly_zero(trajectory):
    # Catches: gradients not masked (moments of pruned entries become nonzero), updates of
    # pruned entries not overridden (weight decay / Adam revive them, -0.0 stays -0.0).
    masks, state = trajectory["masks"], trajectory["state"]
    assert_pruned_exactly_zero(trajectory["final"], masks)
    mu = optax.tree_utils.tree_get(state, "mu")
    nu = optax.tree_utils.tree_get(state, "nu")
    for moment in (mu, nu):
        values = pruned_values(moment, masks)
        assert values.size > 0 and np.all(values == 0.0)
    # The kept weights did move (a no-op optimizer would pass the zero checks above).
    kept = named(masks)["layers/mlp/up_proj"]
    moved = named(trajectory["final"])["layers/mlp/up_proj"] - named(trajectory["params"])[
        "layers/mlp/up_proj"]
    assert np.all(np.abs(moved[kept]) > 0)


def test_kept_weights_follow_numpy_adamw_on_masked_gradients(trajectory):
    # Catches: clipping over raw gradients, a wrong bias correction, eps inside the sqrt,
    # decay on norms or coupled to the gradient, an off-by-one in the lr schedule.
    cfg = trajectory["cfg"]
    assert sum(n > cfg.clip_norm for n in trajectory["masked_norms"]) >= 10  # clipping bites
    assert sum(n < cfg.clip_norm for n in trajectory["masked_norms"]) >= 10
    ref, ref_mu, ref_nu = np_adamw(named(trajectory["params"]), named(trajectory["masks"]),
                                   trajectory["grads"], cfg)
    ours = named(trajectory["final"])
    mu = named(optax.tree_utils.tree_get(trajectory["state"], "mu"))
    nu = named(optax.tree_utils.tree_get(trajectory["state"], "nu"))
    for k in ref:
        np.testing.assert_allclose(ours[k], ref[k], rtol=1e-5, atol=1e-7, err_msg=k)
        # Moments are sums of signed terms: near their zero crossings float32 cancellation
        # leaves absolute errors of about 1e-6 of the leaf's largest moment.
        for ours_m, ref_m in ((mu[k], ref_mu[k]), (nu[k], ref_nu[k])):
            np.testing.assert_allclose(ours_m, ref_m, rtol=1e-5,
                                       atol=1e-5 * np.max(np.abs(ref_m)), err_msg=k)


def test_clipping_over_unmasked_gradients_would_differ(trajectory):
    # Shows the comparison above can fail: a wrapper that masks only after the chain (clipping
    # sees the pruned entries' gradients too) gives kept weights far outside its tolerance.
    ref, _, _ = np_adamw(named(trajectory["params"]), named(trajectory["masks"]),
                         trajectory["grads"], trajectory["cfg"], clip_masked=False)
    ours = named(trajectory["final"])
    kept = named(trajectory["masks"])["layers/mlp/up_proj"]
    start = named(trajectory["params"])["layers/mlp/up_proj"][kept]
    ours_moved = ours["layers/mlp/up_proj"][kept] - start
    ref_moved = ref["layers/mlp/up_proj"][kept] - start
    assert np.max(np.abs(ours_moved - ref_moved)) > 100 * (1e-7 + 1e-5 * np.max(np.abs(start)))


def test_other_transforms_never_revive_pruned_weights():
    # Catches: zeroing the pruned *updates* instead of setting them to -params (weights that
    # a new mask prunes would keep their old values), and transforms after the inner chain's
    # Adam (a constant shift here) leaking into pruned entries.
    params, masks = sparse_params()
    shift = optax.GradientTransformation(
        lambda p: optax.EmptyState(),
        lambda u, s, p=None: (jax.tree.map(lambda x: x + 0.5, u), s))
    opt = keep_sparse(optax.chain(optax.adamw(1e-2, weight_decay=0.5), shift))
    dense = llama.init_params(jax.random.key(3), CFG)  # nonzero where `masks` prunes
    state = set_masks(opt.init(dense), masks)
    grads = jax.tree.map(jnp.ones_like, dense)
    updates, state = opt.update(grads, state, dense)
    new = optax.apply_updates(dense, updates)
    assert_pruned_exactly_zero(new, masks)
    # The shift does reach kept entries (the inner chain ran unchanged there).
    kept = np.asarray(masks["layers"]["mlp"]["up_proj"])
    step = np.asarray(new["layers"]["mlp"]["up_proj"] - dense["layers"]["mlp"]["up_proj"])
    assert np.all(step[kept] > 0.4)


def test_zero_d_masks_cost_nothing_and_traced_masks_work():
    # Catches: a jnp.where on every leaf, 0-d masks included (overhead), and deciding a leaf
    # is dense by a mask's *value* (fails on traced masks: masks are jit arguments).
    params, masks = sparse_params()
    inner = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    opt = keep_sparse(inner)

    def count_selects(jaxpr) -> int:
        # Walk into sub-jaxprs call by call (jnp.where is itself jitted, and a printed
        # jaxpr shows a shared sub-jaxpr only once).
        n = 0
        for eqn in jaxpr.eqns:
            n += eqn.primitive.name == "select_n"
            for value in eqn.params.values():
                for sub in value if isinstance(value, tuple | list) else (value,):
                    if isinstance(sub, jax.extend.core.ClosedJaxpr):
                        n += count_selects(sub.jaxpr)
                    elif isinstance(sub, jax.extend.core.Jaxpr):
                        n += count_selects(sub)
        return n

    def selects(tx, state):
        return count_selects(jax.make_jaxpr(tx.update)(params, state, params).jaxpr)

    full = sum(np.ndim(m) > 0 for m in jax.tree.leaves(masks))
    state = set_masks(opt.init(params), masks)
    assert selects(opt, state) - selects(inner, inner.init(params)) == 2 * full
    # The same update with the masks traced (as the training engine builds states).
    make = jax.jit(lambda p, m: set_masks(opt.init(p), m))
    state = make(params, masks)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = jax.jit(opt.update)(grads, state, params)
    assert_pruned_exactly_zero(optax.apply_updates(params, updates), masks)


def test_extra_args_reach_the_inner_transformation():
    # Catches: extra args dropped by the wrapper, or a plain (no extra args) inner crashing
    # when the caller passes some.
    def init(params):
        return jnp.zeros(())

    def update(updates, state, params=None, *, loss=None, **extra):
        return updates, jnp.asarray(loss, jnp.float32)

    recorder = optax.GradientTransformationExtraArgs(init, update)
    params, _ = sparse_params()
    grads = jax.tree.map(jnp.ones_like, params)
    opt = keep_sparse(recorder)
    assert isinstance(opt, optax.GradientTransformationExtraArgs)
    _, state = opt.update(grads, opt.init(params), params, loss=3.5)
    assert float(state.inner_state) == 3.5
    plain = keep_sparse(optax.sgd(1e-2))
    plain.update(grads, plain.init(params), params, loss=3.5)  # ignored, no TypeError
    with pytest.raises(ValueError, match="needs the params"):
        opt.update(grads, opt.init(params))


def test_init_masks_are_the_zeros_and_set_find_work_through_nesting():
    # Catches: inverted polarity (True must mean kept), masks of dense leaves that are not
    # 0-d, set_masks missing a KeepSparseState nested in a chain or inside another keep_sparse.
    params, masks = sparse_params()
    opt = keep_sparse(optax.adam(1e-3))
    state = opt.init(params)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), find_masks(state), masks)
    assert find_masks(state)["norm"].shape == ()
    assert find_masks(optax.adam(1e-3).init(params)) is None
    nested = optax.chain(optax.scale(1.0), keep_sparse(keep_sparse(optax.sgd(1e-3))))
    other = masks_lib.dense_masks(params)
    replaced = set_masks(nested.init(params), other)
    outer = replaced[1]
    assert isinstance(outer, KeepSparseState) and isinstance(outer.inner_state, KeepSparseState)
    for s in (outer, outer.inner_state):
        assert s.masks is other
    assert find_masks(replaced) is other


# --- through the training engine: make_optimizer + make_train_step -------------------------

def make_batch(b=8, t=16, seed=0):
    return random_batch(CFG.vocab_size, b, t, seed)


ENGINE_STEPS = 3


@pytest.fixture(scope="module")
def engine():
    """make_optimizer(sparse=True) through make_train_step: ENGINE_STEPS steps, one device."""
    params, masks = sparse_params()
    opt, schedule = factory.make_optimizer(opt_cfg(lr=1e-2, warmup_steps=0), total_steps=10,
                                           sparse=True)
    step = make_train_step(CFG, opt, schedule)
    state = state_lib.create(jax.tree.map(jnp.copy, params), opt, seed=0)
    batches = [make_batch(seed=i) for i in range(ENGINE_STEPS + 2)]
    for batch in batches[:ENGINE_STEPS]:
        state, metrics = step(state, batch)
    return {"params": params, "masks": masks, "opt": opt, "schedule": schedule, "step": step,
            "state": state, "batches": batches, "loss": float(metrics["loss"])}


def test_train_step_keeps_exact_zeros(engine):
    # Catches: make_optimizer(sparse=True) not wrapping the chain (dense AdamW revives the
    # pruned weights on the first step), or masks not derived from the params' zeros.
    state = engine["state"]
    assert np.isfinite(engine["loss"])
    assert_pruned_exactly_zero(state.params, engine["masks"])
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b),
                 find_masks(state.opt_state), engine["masks"])
    moved = np.asarray(state.params["layers"]["mlp"]["gate_proj"] - engine["params"][
        "layers"]["mlp"]["gate_proj"])
    assert np.count_nonzero(moved) == np.count_nonzero(engine["masks"]["layers"]["mlp"][
        "gate_proj"])


def test_reported_grad_norm_is_the_masked_gradient_that_clipping_sees(engine):
    # Catches: grad_norm measured on the raw gradients, pruned entries included, while
    # clip_by_global_norm (inside keep-sparse) sees the masked ones.
    params, masks, batch = engine["params"], engine["masks"], engine["batches"][0]
    state = state_lib.create(jax.tree.map(jnp.copy, params), engine["opt"], seed=0)
    _, metrics = engine["step"](state, batch)

    def mean_loss(p):
        total, count = lm_loss(p, batch, CFG)
        return total / count
    grads = jax.device_get(jax.jit(jax.grad(mean_loss))(params))
    squares = [np.sum(np.where(np.asarray(m), np.asarray(g, np.float64), 0.0) ** 2)
               for g, m in zip(jax.tree.leaves(grads), jax.tree.leaves(masks), strict=True)]
    masked = float(np.sqrt(np.sum(squares)))
    raw = float(np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2)
                            for g in jax.tree.leaves(grads))))
    assert raw > 1.05 * masked  # the pruned entries' gradients are not negligible here
    assert float(metrics["grad_norm"]) == pytest.approx(masked, rel=1e-5)


def test_checkpoint_round_trip_keeps_masks_and_zeros(tmp_path, engine):
    # Catches: masks not saved or restored with the optimizer state (e.g. recomputed from
    # a fresh model, all True), restored with another dtype, or the restored state no longer
    # keeping the zeros.
    mc = blocks.mesh()
    mesh, rules = sharding.make_mesh(mc), sharding.rules_from_config(mc)
    abstract = state_lib.abstract_state(CFG, engine["opt"], mesh, rules)
    state = jax.tree.map(jnp.copy, engine["state"])
    ckpt = Checkpoints(str(tmp_path))
    ckpt.save(state, {}, model=CFG, run_config={})
    ckpt.wait()
    restored, _ = ckpt.restore(ENGINE_STEPS, abstract, model=CFG)
    ckpt.close()
    masks = find_masks(restored.opt_state)
    jax.tree.map(np.testing.assert_array_equal, masks, engine["masks"])
    assert all(m.dtype == jnp.bool_ for m in jax.tree.leaves(masks))
    for batch in engine["batches"][ENGINE_STEPS:]:
        restored, _ = engine["step"](restored, batch)
    assert_pruned_exactly_zero(restored.params, engine["masks"])


def test_export_has_exact_zeros_at_pruned_entries(tmp_path, engine):
    # Catches: an export path that densifies or perturbs the pruned weights, and a transposed
    # comparison (HF stores (out, in): the zeros of our w[i] are those of the HF tensor's .T).
    params = engine["state"].params
    out = export_params(params, CFG, str(tmp_path / "hf"), tokenizer_dir=None)
    tensors = {}
    for file in glob.glob(str(out / "*.safetensors")):
        tensors.update(load_file(file))
    masks = engine["masks"]
    for group, name in [("self_attn", n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")] + [
            ("mlp", n) for n in ("gate_proj", "up_proj", "down_proj")]:
        mask = np.asarray(masks["layers"][group][name])
        for i in range(CFG.num_layers):
            hf = tensors[f"model.layers.{i}.{group}.{name}.weight"]
            kept = mask[i].T  # (in, out) -> HF (out, in)
            assert hf.shape == kept.shape
            assert np.all(hf[~kept] == 0.0) and np.all(hf[kept] != 0.0), (i, name)


def test_sharded_masks_follow_their_params_and_runs_match(engine):
    # Catches: masks replicated on every device (or 0-d masks given a sharded spec, which
    # does not even compile), and a sharded run that drifts from the unsharded one.
    mc = blocks.mesh()
    mc.data, mc.fsdp, mc.tensor = 2, 4, 1
    mesh, rules = sharding.make_mesh(mc), sharding.rules_from_config(mc)
    opt = engine["opt"]
    state = state_lib.state_from_params(jax.device_get(engine["params"]), opt, mesh, rules,
                                        seed=0)
    masks = find_masks(state.opt_state)
    specs = jax.tree.map(lambda w, m: (w.sharding.spec, m.sharding.spec, m.ndim),
                         state.params, masks)
    for p_spec, m_spec, ndim in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, tuple)):
        assert m_spec == (p_spec if ndim else jax.sharding.PartitionSpec())
    assert "fsdp" in str(masks["layers"]["mlp"]["up_proj"].sharding.spec)  # really split
    # The abstract restore target describes the same layouts.
    abstract = state_lib.abstract_state(CFG, opt, mesh, rules)
    abstract_specs = jax.tree.map(lambda a: a.sharding.spec, find_masks(abstract.opt_state))
    assert abstract_specs == jax.tree.map(lambda m: m.sharding.spec, masks)
    step = make_train_step(CFG, opt, engine["schedule"],
                           state_shardings=state_lib.shardings_for(state, opt, mesh, rules),
                           batch_sharding=sharding.batch_sharding(mesh, rules))
    for batch in engine["batches"][:ENGINE_STEPS]:
        state, _ = step(state, batch)
    assert_pruned_exactly_zero(state.params, engine["masks"])
    # Sharded reductions sum in another order. Where a weight's successive gradients nearly
    # cancel, Adam's m / sqrt(v) amplifies that rounding into a few 1e-3 of an lr-sized
    # step (seen: 2.5e-5 at lr 1e-2 on one entry of 22528), hence atol = 1% of lr; a wrong
    # layout or misplaced mask shard moves weights by whole steps or revives zeros instead.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4),
                 jax.device_get(state.params), jax.device_get(engine["state"].params))
