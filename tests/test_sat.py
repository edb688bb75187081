"""SAT (sparse_llama/sat, optim/sat.py): the gathered forward/backward over kept units equals
the dense one with the omitted units' weights zeroed; freezing leaves omitted units and their
moments untouched; sampling follows softmax(score / T); every score matches a numpy
reference computed from the params alone (its own forward: RMSNorm, RoPE attention, SwiGLU);
LORS rungs, short tails included; bad `sat.*` values are one-line errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import blocks
from sparse_llama.model import llama
from sparse_llama.model.config import preset
from sparse_llama.optim import keep_sparse
from sparse_llama.optim.factory import make_optimizer
from sparse_llama.optim.sat import SatState, find_sat_state, sat_transform
from sparse_llama.sat import objective as sat_objective
from sparse_llama.sat import schedule, scores, selection

GQA = preset("tiny").replace(vocab_size=64, max_position_embeddings=32)  # H=4, K=2, F=176
MHA = GQA.replace(num_kv_heads=4)


def tokens(cfg, b=2, t=12, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, (b, t)))


def zero_omitted(params, cfg, layer, keep_f, keep_g):
    """Params with the omitted channels' and groups' weights of `layer` set to 0."""
    e, g = cfg.dim_per_head, cfg.num_heads // cfg.num_kv_heads
    f_on = np.zeros(cfg.intermediate_size, bool)
    f_on[keep_f] = True
    g_on = np.zeros(cfg.num_kv_heads, bool)
    g_on[keep_g] = True
    q_on, kv_on = np.repeat(g_on, g * e), np.repeat(g_on, e)
    lay = jax.tree.map(jnp.array, params["layers"])
    m, a = lay["mlp"], lay["self_attn"]
    m["gate_proj"] = m["gate_proj"].at[layer].multiply(f_on[None, :])
    m["up_proj"] = m["up_proj"].at[layer].multiply(f_on[None, :])
    m["down_proj"] = m["down_proj"].at[layer].multiply(f_on[:, None])
    a["q_proj"] = a["q_proj"].at[layer].multiply(q_on[None, :])
    a["k_proj"] = a["k_proj"].at[layer].multiply(kv_on[None, :])
    a["v_proj"] = a["v_proj"].at[layer].multiply(kv_on[None, :])
    a["o_proj"] = a["o_proj"].at[layer].multiply(q_on[:, None])
    return {**params, "layers": lay}


@pytest.mark.parametrize("cfg", [MHA, GQA], ids=["mha", "gqa"])
def test_gathered_units_equal_dense_with_omitted_weights_zeroed(cfg):
    """Values and gradients, with layer 1 dense (the per-layer list path); omitted units get
    exactly zero gradient."""
    params = llama.init_params(jax.random.key(1), cfg, init_std=0.2)
    x = tokens(cfg)
    probe = jax.random.normal(jax.random.key(2), (*x.shape, cfg.vocab_size))
    keep_f = np.sort(np.random.default_rng(3).choice(cfg.intermediate_size, 60, replace=False))
    keep_g = np.array([1] if cfg.num_kv_heads == 2 else [0, 3])
    n_idx = [jnp.asarray(keep_f), None]
    g_idx = [jnp.asarray(keep_g), None]

    @jax.jit
    def gathered(p):
        return jnp.sum(llama.forward(p, x, cfg, neuron_idx=n_idx, group_idx=g_idx) * probe)

    @jax.jit
    def dense(p):
        return jnp.sum(llama.forward(p, x, cfg) * probe)

    zeroed = zero_omitted(params, cfg, 0, keep_f, keep_g)
    v1, g1 = jax.value_and_grad(gathered)(params)
    v2, g2 = jax.value_and_grad(dense)(zeroed)
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        scale = float(np.max(np.abs(b))) or 1.0  # float32 sums of different order
        np.testing.assert_allclose(a, b, atol=2e-5 * scale, rtol=1e-4)
    # Omitted units: exactly zero gradient in the gathered path.
    omitted = np.setdiff1d(np.arange(cfg.intermediate_size), keep_f)
    assert not np.any(np.asarray(g1["layers"]["mlp"]["gate_proj"][0][:, omitted]))
    assert not np.any(np.asarray(g1["layers"]["mlp"]["down_proj"][0][omitted]))
    e = cfg.dim_per_head
    dropped_kv = [c for grp in range(cfg.num_kv_heads) if grp not in keep_g
                  for c in range(grp * e, (grp + 1) * e)]
    assert not np.any(np.asarray(g1["layers"]["self_attn"]["k_proj"][0][:, dropped_kv]))
    assert np.any(np.asarray(g1["layers"]["self_attn"]["k_proj"][1][:, dropped_kv]))


def step_args(cfg, layers, keep_f, keep_g):
    return {"sat_neuron_idx": jnp.asarray([keep_f] * len(layers), jnp.int32),
            "sat_group_idx": jnp.asarray([keep_g] * len(layers), jnp.int32)}


@pytest.mark.parametrize("freeze", [True, False])
def test_freeze_omitted_leaves_params_and_moments_untouched(freeze):
    cfg = GQA
    params = llama.init_params(jax.random.key(0), cfg)
    # A sparse model: keep-sparse inside SAT must keep its zeros.
    gate = params["layers"]["mlp"]["gate_proj"]
    params["layers"]["mlp"]["gate_proj"] = gate.at[:, :, :8].set(0.0)
    inner, _ = make_optimizer(blocks.optimizer(lr=1e-2), 100, sparse=True)
    opt = sat_transform(inner, cfg, layers=(1,), freeze_omitted=freeze)
    state = opt.init(params)
    rng = np.random.default_rng(0)

    def grads_for(keep_f=None, keep_g=None):
        g = jax.tree.map(lambda w: jnp.asarray(rng.normal(size=w.shape), w.dtype), params)
        return zero_omitted(g, cfg, 1, keep_f, keep_g) if keep_f is not None else g

    update = jax.jit(opt.update)
    u, state = update(grads_for(), state, params)  # dense step: every moment nonzero
    p1 = optax.apply_updates(params, u)
    keep_f, keep_g = np.arange(0, cfg.intermediate_size, 3), np.array([0])
    args = step_args(cfg, (1,), keep_f, keep_g)
    u, state2 = update(grads_for(keep_f, keep_g), state, p1, **args)
    p2 = optax.apply_updates(p1, u)

    omitted_f = np.setdiff1d(np.arange(cfg.intermediate_size), keep_f)
    e = cfg.dim_per_head
    q_off = np.arange(2 * e, 4 * e)  # group 1 = query heads 2, 3
    kv_off = np.arange(e, 2 * e)

    def parts(tree):
        m, a = tree["layers"]["mlp"], tree["layers"]["self_attn"]
        return {"gate": np.asarray(m["gate_proj"][1][:, omitted_f]),
                "down": np.asarray(m["down_proj"][1][omitted_f]),
                "q": np.asarray(a["q_proj"][1][:, q_off]),
                "v": np.asarray(a["v_proj"][1][:, kv_off]),
                "o": np.asarray(a["o_proj"][1][q_off])}

    adam = lambda s: [x for x in jax.tree.leaves(  # noqa: E731
        s, is_leaf=lambda n: isinstance(n, optax.ScaleByAdamState))
        if isinstance(x, optax.ScaleByAdamState)][0]
    mu1, mu2 = adam(state).mu, adam(state2).mu
    nu1, nu2 = adam(state).nu, adam(state2).nu
    for name in parts(p1):
        same = [np.array_equal(parts(a)[name], parts(b)[name])
                for a, b in ((p1, p2), (mu1, mu2), (nu1, nu2))]
        assert same == [freeze] * 3, name
    # Kept units of the SAT layer and every unit of the non-SAT layer 0 moved.
    assert not np.array_equal(p1["layers"]["mlp"]["gate_proj"][1][:, keep_f[1:]],
                              p2["layers"]["mlp"]["gate_proj"][1][:, keep_f[1:]])
    assert not np.array_equal(p1["layers"]["mlp"]["gate_proj"][0][:, 9:],
                              p2["layers"]["mlp"]["gate_proj"][0][:, 9:])
    # Keep-sparse's zeros survive both steps.
    assert not np.any(np.asarray(p2["layers"]["mlp"]["gate_proj"][:, :, :8]))
    assert keep_sparse.find_masks(state2) is not None
    sat = find_sat_state(state2)
    assert isinstance(sat, SatState) and int(sat.count) == 2
    np.testing.assert_array_equal(sat.mlp_kept_steps[1, keep_f], 2)
    np.testing.assert_array_equal(sat.mlp_kept_steps[1, omitted_f], 1)
    np.testing.assert_array_equal(sat.mlp_kept_steps[0], 2)
    np.testing.assert_array_equal(sat.group_kept_steps[1], [2, 1])


def test_sampling_frequencies_follow_softmax_of_score_over_temperature():
    s = jnp.asarray([[1.0, 0.97, 0.95, 0.9, 0.5, 0.1]]) * 3.0  # "max" normalisation undoes x3
    n = 20000
    keys = jax.random.split(jax.random.key(0), n)
    picks = jax.jit(jax.vmap(lambda k: selection.select(s, 1, k, selection="sampling")[0, 0]))(
        keys)
    counts = np.bincount(np.asarray(picks), minlength=6)
    p = np.asarray(jax.nn.softmax(s[0] / 3.0 / 0.05))
    expected = n * p
    big = expected > 5
    chi2 = np.sum((counts[big] - expected[big]) ** 2 / expected[big])
    assert chi2 < 20.0, (counts, expected)  # 4 dof: p < 0.001 at 18.5
    assert counts[5] <= 2  # p = 1e-7
    # Without replacement: k distinct, sorted; top-k is the k largest.
    two = selection.select(s, 3, jax.random.key(1), selection="sampling")
    assert len(set(np.asarray(two[0]).tolist())) == 3 and np.all(np.diff(two[0]) > 0)
    np.testing.assert_array_equal(selection.select(s, 2, None, selection="topk"), [[0, 1]])


def _rms_norm(x, scale, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * scale


def _rope(x, positions, theta):
    """Rotate-half rotary embedding of x (b, t, n, e) at `positions` (b, t)."""
    e = x.shape[-1]
    angles = positions[..., None] / theta ** (np.arange(0, e, 2) / e)  # b t e/2
    cos, sin = (np.concatenate([f(angles)] * 2, -1)[:, :, None, :] for f in (np.cos, np.sin))
    return x * cos + np.concatenate([-x[..., e // 2:], x[..., :e // 2]], -1) * sin


def numpy_block_inputs(params, x, seg, cfg):
    """Per block, the inputs of its linears, float64 numpy from the params alone (the model's
    forward is not called): h = RMSNorm (q/k/v input), c the attention context (o_proj input;
    RoPE, causal within segments, GQA), x2 = RMSNorm (gate/up input), a = SiLU(x2 W_gate) *
    (x2 W_up) (down input)."""
    assert cfg.rope_scaling is None and not cfg.tie_word_embeddings
    p = jax.tree.map(lambda v: np.asarray(v, np.float64), jax.device_get(params))
    b, t = x.shape
    e, h, k = cfg.dim_per_head, cfg.num_heads, cfg.num_kv_heads
    pos = np.broadcast_to(np.arange(t, dtype=np.float64), (b, t))
    seg = np.asarray(seg)
    allowed = (np.arange(t)[None, :, None] >= np.arange(t)[None, None, :]) & (
        seg[:, :, None] == seg[:, None, :])  # b t s
    hidden = p["embed_tokens"][np.asarray(x)]
    out = []
    for i in range(cfg.num_layers):
        lay = jax.tree.map(lambda v, i=i: v[i], p["layers"])
        att, mlp = lay["self_attn"], lay["mlp"]
        hn = _rms_norm(hidden, lay["input_layernorm"], cfg.rms_norm_eps)
        q = _rope((hn @ att["q_proj"]).reshape(b, t, h, e), pos, cfg.rope_theta)
        kk = _rope((hn @ att["k_proj"]).reshape(b, t, k, e), pos, cfg.rope_theta)
        v = (hn @ att["v_proj"]).reshape(b, t, k, e)
        kk, v = np.repeat(kk, h // k, axis=2), np.repeat(v, h // k, axis=2)  # head j: group j//G
        logits = np.einsum("bthe,bshe->bhts", q, kk) / np.sqrt(e)
        logits = np.where(allowed[:, None], logits, -np.inf)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        c = np.einsum("bhts,bshe->bthe", probs, v).reshape(b, t, h * e)
        hidden = hidden + c @ att["o_proj"]
        x2 = _rms_norm(hidden, lay["post_attention_layernorm"], cfg.rms_norm_eps)
        gate = x2 @ mlp["gate_proj"]
        a = gate / (1 + np.exp(-gate)) * (x2 @ mlp["up_proj"])
        hidden = hidden + a @ mlp["down_proj"]
        out.append({"qkv": hn, "o_proj": c, "gate_up": x2, "down_proj": a})
    return out


def numpy_scores(metric, params, x, seg, cfg):
    """Scores in numpy from the params: the activations of `numpy_block_inputs`, then the
    reductions of sat/scores.py's docstring."""
    w = np.asarray(seg > 0, np.float64)[..., None]
    e, h, k = cfg.dim_per_head, cfg.num_heads, cfg.num_kv_heads
    mlp_out, grp_out = [], []
    for i, t in enumerate(numpy_block_inputs(params, x, seg, cfg)):
        p = jax.device_get(llama.layer_params(params, i))
        m = {n: np.abs(np.asarray(v, np.float64)) for n, v in p["mlp"].items()}
        a = {n: np.abs(np.asarray(v, np.float64)) for n, v in p["self_attn"].items()}
        norm = lambda v: np.sqrt((w * v * v).sum((0, 1)))  # noqa: E731
        if metric == "uniform":
            f_s, q_s, kv_s = np.ones(cfg.intermediate_size), None, None
            g_s = np.ones(k)
        elif metric == "magnitude":
            f_s = m["gate_proj"].sum(0) + m["up_proj"].sum(0) + m["down_proj"].sum(1)
            q_s = a["q_proj"].sum(0) + a["o_proj"].sum(1)
            kv_s = a["k_proj"].sum(0) + a["v_proj"].sum(0)
        elif metric == "wanda":
            x2, act = norm(t["gate_up"]), norm(t["down_proj"])
            f_s = x2 @ m["gate_proj"] + x2 @ m["up_proj"] + act * m["down_proj"].sum(1)
            hn, cn = norm(t["qkv"]), norm(t["o_proj"])
            q_s = hn @ a["q_proj"] + cn * a["o_proj"].sum(1)
            kv_s = hn @ a["k_proj"] + hn @ a["v_proj"]
        else:
            f_s, q_s = (np.abs(t["down_proj"]) * w).max((0, 1)), None
            ctx = t["o_proj"].reshape(*x.shape, h, e)
            per_head = (np.sqrt((ctx ** 2).sum(-1)) * w).max((0, 1))
            g_s = per_head.reshape(k, -1).sum(-1)
        if q_s is not None:
            g_s = q_s.reshape(k, -1).sum(-1) + kv_s.reshape(k, -1).sum(-1)
        mlp_out.append(f_s)
        grp_out.append(g_s)
    return np.stack(mlp_out), np.stack(grp_out)


@pytest.mark.parametrize("metric", scores.METRICS)
def test_scores_match_a_numpy_reference(metric):
    cfg = GQA
    params = llama.init_params(jax.random.key(4), cfg, init_std=0.1)
    x = tokens(cfg, b=3, t=10, seed=5)
    seg = jnp.ones(x.shape, jnp.int32).at[2, 6:].set(0)  # padding must not count
    batch = {"inputs": x, "segment_ids": seg,
             "positions": jnp.broadcast_to(jnp.arange(10), x.shape)}
    got_f, got_g = scores.unit_scores(metric, params, batch, cfg)
    want_f, want_g = numpy_scores(metric, params, x, seg, cfg)
    np.testing.assert_allclose(got_f, want_f, rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(got_g, want_g, rtol=2e-4, atol=1e-6)
    if metric in scores.NEEDS_ACTIVATIONS:  # the padding really is excluded
        seg0 = jnp.ones_like(seg)
        other = scores.unit_scores(metric, params, {**batch, "segment_ids": seg0}, cfg)[0]
        assert not np.allclose(other, got_f)


def test_subsample_takes_strided_rows_and_a_prefix():
    batch = {"inputs": jnp.arange(8 * 6).reshape(8, 6), "loss_mask": jnp.ones((8, 6))}
    sub = scores.subsample(batch, 0.25, 4)
    np.testing.assert_array_equal(sub["inputs"], [[0, 1, 2, 3], [24, 25, 26, 27]])
    assert "loss_mask" not in sub


def test_lors_rates_at_given_steps():
    ladder = schedule.Ladder.make(0.5, 0.5, total_steps=100, constant_fraction=0.6, rungs=4)
    got = {s: ladder.rung(s) for s in (0, 59, 60, 69, 70, 79, 80, 89, 90, 99, 150)}
    assert got == {0: 0, 59: 0, 60: 1, 69: 1, 70: 2, 79: 2, 80: 3, 89: 3, 90: 4, 99: 4, 150: 4}
    assert ladder.omission_rate(0) == (0.5, 0.5)
    assert ladder.omission_rate(65) == (0.375, 0.375)
    assert ladder.omission_rate(95) == (0.0, 0.0)
    assert ladder.num_rungs == 5
    flat = schedule.Ladder.make(0.5, 0.0, total_steps=100, constant_fraction=1.0, rungs=4)
    assert {flat.rung(s) for s in range(100)} == {0} and flat.num_rungs == 1
    # Counts: F = 176 at 0.375 -> 176 - round(66) = 110; K = 2 groups at 0.25 -> round(0.5) = 1
    assert schedule.kept_count(0.375, 176) == 110
    assert schedule.kept_count(0.25, 2) == 1
    plan = sat_objective.make_plan(blocks.sat(0.5, 0.5), GQA, 100)
    assert [sat_objective.rung_counts(plan, GQA, j) for j in range(5)] == [
        (88, 1), (110, 1), (132, 1), (154, 2), (176, 2)]


@pytest.mark.parametrize("steps", [10, 15])
def test_a_short_tail_still_ends_on_the_dense_rung(steps):
    """The defaults (constant_fraction 0.8, 4 rungs) on 10 or 15 steps leave a tail of 2 or
    3 updates, fewer than the rungs: the final update is still dense, the tail descends."""
    plan = sat_objective.make_plan(blocks.sat(0.5, 0.5), GQA, steps)
    ladder = plan.ladder
    assert ladder.omission_rate(steps - 1) == (0.0, 0.0)
    assert sat_objective.rung_counts(plan, GQA, ladder.rung(steps - 1)) == (176, 2)
    tail = [ladder.rung(s) for s in range(ladder.constant_steps, steps)]
    assert tail == {10: [2, 4], 15: [2, 3, 4]}[steps]  # rungs 1 (and 3) are empty
    assert ladder.num_rungs == 1 + len(tail)  # the compiled steps: the rungs it visits


def test_lors_rungs_are_the_documented_intervals():
    """rung j (1..n) covers [C + (j-1) T // n, C + j T // n) (sat/schedule.py), some empty
    when T < n; the last step is always on rung n (dense)."""
    for steps in range(1, 41):
        for frac in (0.0, 0.5, 0.8):
            for n in (1, 2, 4, 5):
                ladder = schedule.Ladder.make(0.5, 0.5, steps, frac, n)
                c = ladder.constant_steps
                t = steps - c
                want = [0] * c + [next(j for j in range(1, n + 1)
                                       if c + (j - 1) * t // n <= s < c + j * t // n)
                                  for s in range(c, steps)]
                assert [ladder.rung(s) for s in range(steps)] == want, (steps, frac, n)
                assert t == 0 or ladder.omission_rate(steps - 1) == (0.0, 0.0)


@pytest.mark.parametrize("key,value,match", [
    ("metric", "random", r"sat\.metric='random' is not one of"),
    ("selection", "greedy", r"sat\.selection='greedy'"),
    ("mlp_rate", 1.0, r"sat\.mlp_rate=1\.0 must be in \[0, 1\)"),
    ("mlp_rate", 0.999, r"sat\.mlp_rate=0\.999 leaves no MLP channels"),
    ("head_rate", 0.3, r"sat\.head_rate=0\.3 omits 0\.6 of the model's 2 KV groups"),
    ("layers", "1,2", r"sat\.layers='1,2' names blocks \[2\] outside the model's 2 blocks"),
    ("temperature", 0.0, r"sat\.temperature=0\.0 must be a positive"),
    ("normalize", "l2", r"sat\.normalize='l2'"),
])
def test_bad_sat_values_are_one_line_errors(key, value, match):
    sat = blocks.sat()
    sat[key] = value
    with pytest.raises(ValueError, match=match) as err:
        sat_objective.make_plan(sat, GQA, 100)
    assert "\n" not in str(err.value)


def test_layer_subset_needs_unrolled_blocks_under_scan():
    sat = blocks.sat()
    sat.layers = "0"
    with pytest.raises(ValueError, match="model.scan_layers=0"):
        sat_objective.make_plan(sat, GQA.replace(scan_layers=True), 100)
    assert sat_objective.make_plan(sat, GQA, 100).layers == (0,)


@pytest.mark.parametrize("config_name", ["sat_cpt", "sat_sft"])
@pytest.mark.parametrize("variant", ["tiny", "m25"])
def test_configs_build_a_valid_plan(config_name, variant):
    import importlib

    c = importlib.import_module(f"configs.{config_name}").get_config(variant)
    assert c.train.objective == "sat"
    plan = sat_objective.make_plan(c.sat, preset(c.model.preset), c.train.steps)
    assert plan.ladder.num_rungs == 1 + c.sat.lors.rungs
    assert plan.layers == tuple(range(preset(c.model.preset).num_layers))
