"""The objective registry through the train step and the loop: frozen inputs are arguments of
the compiled step, terms are reported as sum / weight (exact under accumulation), `prepare`'s
step arguments reach the loss and `optimizer.update`, the per-step key is
`fold_in(state.rng, state.step)`, and an unknown `train.objective` is refused."""

import json
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import blocks, dense
from sparse_llama import objectives
from sparse_llama.commands import train as train_command
from sparse_llama.model import llama, sharding
from sparse_llama.model.config import preset
from sparse_llama.model.loss import lm_loss
from sparse_llama.optim.factory import make_optimizer
from sparse_llama.optim.keep_sparse import KeepSparseState
from sparse_llama.train import export, run_setup
from sparse_llama.train import state as state_lib
from sparse_llama.train.checkpoint import Checkpoints
from sparse_llama.train.objective import Objective
from sparse_llama.train.step import make_train_step

CFG = preset("tiny").replace(vocab_size=64, max_position_embeddings=32)
B, T = 8, 16


def make_batch(seed=0):
    """8 rows of 16 tokens; the odd rows (micro-batch 1 of 2: rows j, j+2, ...) count only
    their first 2 tokens, so the two micro-batches weigh 64 and 8 tokens."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, CFG.vocab_size, (B, T + 1)).astype(np.int32)
    mask = np.ones((B, T), np.float32)
    mask[1::2, 2:] = 0
    return {"inputs": jnp.asarray(x[:, :-1]), "targets": jnp.asarray(x[:, 1:]),
            "segment_ids": jnp.ones((B, T), jnp.int32),
            "positions": jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)),
            "loss_mask": jnp.asarray(mask)}


def sq_dist(params, ref) -> jax.Array:
    return sum(jnp.sum(jnp.square(p.astype(jnp.float32) - r)) for p, r in
               zip(jax.tree.leaves(params), jax.tree.leaves(ref), strict=True))


class Seen(NamedTuple):
    """What the recording transformation saw in its last update."""
    calls: jax.Array
    u: jax.Array
    tokens: jax.Array


def recorder() -> optax.GradientTransformationExtraArgs:
    """Leaves updates alone and stores the step arguments `u` and `tokens` in its state.

    Both are required keyword arguments: an update without them is a TypeError."""
    def init(params):
        del params
        return Seen(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32),
                    jnp.zeros((), jnp.float32))

    def update(updates, state, params=None, *, u, tokens, **extra):
        del params, extra
        return updates, Seen(state.calls + 1, jnp.asarray(u, jnp.float32),
                             jnp.asarray(tokens, jnp.float32))

    return optax.GradientTransformationExtraArgs(init, update)


def seen(opt_state) -> Seen:
    found = [x for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, Seen))
             if isinstance(x, Seen)]
    assert len(found) == 1
    return found[0]


def probe_objective(model, inputs=None, input_shardings=None) -> Objective:
    """The LM loss plus terms that expose what the step feeds an objective.

    prepare: {"u": uniform(rng), "tokens": loss tokens of the whole batch}
    terms:   nll    (nll sum, tokens)               = the step's loss
             pos    (sum of loss_mask * position, tokens): 7.5 on full rows, 0.5 on the odd
                    rows, so sum/weight, mean of micro ratios and last micro differ
             noise  (uniform(loss rng), 1)
             tokens (step_args tokens, 1)             = the prepared value, per micro-batch
             anchor (|params - inputs|^2, 1)           only with inputs
    """
    def prepare(params, batch, rng, inputs):
        del params, inputs
        return {"u": jax.random.uniform(rng), "tokens": jnp.sum(batch["loss_mask"])}

    def loss(params, batch, rng, inputs, step_args):
        total, count = lm_loss(params, batch, model)
        pos = jnp.sum(batch["loss_mask"] * batch["positions"].astype(jnp.float32))
        one = jnp.ones((), jnp.float32)
        terms = {"nll": (total, count), "pos": (pos, count),
                 "noise": (jax.random.uniform(rng), one),
                 "tokens": (step_args["tokens"], one)}
        if inputs is not None:
            terms["anchor"] = (sq_dist(params, inputs), one)
        return total, count, terms

    return Objective(loss=loss, prepare=prepare, inputs=inputs, input_shardings=input_shardings,
                     transform=lambda opt: optax.chain(opt, recorder()))


@pytest.fixture(scope="module")
def params():
    return jax.device_get(llama.init_params(jax.random.key(0), CFG))


def optimizer(objective):
    cfg = blocks.optimizer(lr=1e-2)
    cfg.warmup_steps = 0
    opt, schedule = make_optimizer(cfg, total_steps=10, sparse=True)
    return objective.transform(opt), schedule


def fresh_state(params, opt, seed=3):
    return state_lib.create(jax.tree.map(jnp.asarray, params), opt, seed=seed)


@pytest.fixture(scope="module")
def accum_runs(params):
    """{k: [(metrics, Seen), ...] of two steps} for grad_accum k = 1 and 2, same batches."""
    objective = probe_objective(CFG)
    opt, schedule = optimizer(objective)
    out = {}
    for k in (1, 2):
        step = make_train_step(CFG, opt, schedule, grad_accum=k, objective=objective)
        state = fresh_state(params, opt)
        runs = []
        for i in range(2):
            state, metrics = step(state, make_batch(seed=i))
            runs.append((jax.device_get(metrics), jax.device_get(seen(state.opt_state))))
        out[k] = runs
    return out


def test_terms_are_sum_over_weight_and_exact_under_accumulation(params, accum_runs):
    batch = make_batch()
    total, count = lm_loss(jax.tree.map(jnp.asarray, params), batch, CFG)
    mask = np.asarray(batch["loss_mask"])
    pos_sum = float(np.sum(mask * np.arange(T)))
    expected_pos = pos_sum / mask.sum()  # 484 / 72
    # The alternatives a wrong reduction would report, all far from the right value.
    micro_ratios = [float(np.sum(mask[j::2] * np.arange(T)) / mask[j::2].sum()) for j in (0, 1)]
    for wrong in (np.mean(micro_ratios), micro_ratios[-1], pos_sum):
        assert abs(wrong - expected_pos) > 0.5
    for k in (1, 2):
        m, _ = accum_runs[k][0]
        # Catches: a term averaged over micro-batches (4.0), the last micro-batch's ratio
        # (0.5), the sum not divided by its weight (484).
        assert float(m["pos"]) == pytest.approx(expected_pos, rel=1e-6), k
        # Catches: the nll term or the loss weighted per micro-batch instead of per token.
        assert float(m["nll"]) == pytest.approx(float(total / count), rel=1e-5), k
        assert float(m["loss"]) == pytest.approx(float(m["nll"]), rel=1e-6), k
    for i in range(2):
        one, two = accum_runs[1][i][0], accum_runs[2][i][0]
        for name in ("nll", "pos", "tokens", "loss"):
            assert float(two[name]) == pytest.approx(float(one[name]), rel=1e-5), (i, name)


def test_step_key_is_fold_in_of_state_rng_and_step(accum_runs):
    base = state_lib._keys(3)[1]  # the state's rng for seed 3
    for i in range(2):
        key = jax.random.fold_in(base, i)
        # prepare's key, recorded by the optimizer: catches a key that ignores the step (the
        # same value every step) or folds in something else.
        for k in (1, 2):
            _, s = accum_runs[k][i]
            assert float(s.u) == pytest.approx(float(jax.random.uniform(key)), abs=0), (i, k)
        # The loss's key: the step key itself without accumulation, fold_in(key, j) for
        # micro-batch j with it (noise = the mean over the 2 micro-batches).
        m1, _ = accum_runs[1][i]
        assert float(m1["noise"]) == pytest.approx(float(jax.random.uniform(key)), rel=1e-6)
        m2, _ = accum_runs[2][i]
        mean = np.mean([float(jax.random.uniform(jax.random.fold_in(key, j))) for j in (0, 1)])
        assert float(m2["noise"]) == pytest.approx(mean, rel=1e-6)
    assert accum_runs[1][0][1].u != accum_runs[1][1][1].u


def test_step_args_reach_the_optimizer_and_every_micro_batch(accum_runs):
    for k in (1, 2):
        for i in range(2):
            m, s = accum_runs[k][i]
            tokens = float(np.sum(np.asarray(make_batch(seed=i)["loss_mask"])))
            # The recorder requires u= and tokens= as keyword arguments: an update without
            # them would not even trace; and it must see this step's values.
            assert float(s.tokens) == tokens == 72.0
            assert int(s.calls) == i + 1  # its state is carried from step to step
            # The whole batch's prepared value reached each micro-batch's loss.
            assert float(m["tokens"]) == pytest.approx(tokens, rel=1e-6)


def test_inputs_are_sharded_arguments_of_the_compiled_step(params):
    mc = blocks.mesh()
    mc.data, mc.fsdp = 1, 8
    mesh, rules = sharding.make_mesh(mc), sharding.rules_from_config(mc)
    ref_a = jax.device_get(llama.init_params(jax.random.key(1), CFG))
    ref_b = jax.tree.map(lambda w: w + np.float32(0.5), ref_a)
    ref_sh = sharding.param_shardings(ref_a, mesh, rules)
    objective = probe_objective(CFG, inputs=ref_a, input_shardings=ref_sh)
    opt, schedule = optimizer(objective)
    state = state_lib.state_from_params(params, opt, mesh, rules, seed=3)
    bsh = sharding.batch_sharding(mesh, rules)
    step = make_train_step(CFG, opt, schedule, objective=objective, batch_sharding=bsh,
                           state_shardings=state_lib.shardings_for(state, opt, mesh, rules))
    batch = jax.tree.map(lambda x: jax.device_put(x, bsh), make_batch())
    lowered = step.lower(state, batch, ref_a)
    # The frozen copy is a parameter of the program, not a literal folded into it: a baked
    # 64 x 64 embedding would be a long dense<...> constant in the text.
    longest = max((len(line) for line in lowered.as_text().splitlines() if "constant" in line),
                  default=0)
    assert longest < 2000
    placed = lowered.compile().input_shardings[0][2]
    # Catches: inputs replicated (a 7B teacher copied to every device) instead of following
    # objective.input_shardings.
    assert placed["embed_tokens"].spec == ref_sh["embed_tokens"].spec
    assert "fsdp" in str(placed["layers"]["mlp"]["up_proj"].spec)
    host = jax.tree.map(jnp.asarray, params)
    for ref in (ref_a, ref_b):
        _, metrics = step(jax.tree.map(jnp.copy, state), batch, ref)
        # Catches: the step closing over objective.inputs (new inputs would change nothing).
        want = float(sq_dist(host, ref))
        assert float(metrics["anchor"]) == pytest.approx(want, rel=1e-5)
    assert abs(float(sq_dist(host, ref_a)) - float(sq_dist(host, ref_b))) > 1.0
    # New values of the same shapes reuse the program (catches inputs traced as static).
    assert step._cache_size() == 1


def loop_config(steps=3):
    config = dense.get_config("tiny")
    config.data.seq_len = 32
    config.train.update(steps=steps, batch_size=16, grad_accum=2, log_every=1, eval_every=0,
                        eval_batches=0, checkpoint_every=0, export_hf=False)
    config.optimizer.warmup_steps = 1
    config.sparsity = blocks.sparsity(keep=True)
    config.sparsity.update(init="random", sparsity=0.5)
    return config


def test_loop_builds_the_registered_objective_and_feeds_it(tmp_path, monkeypatch):
    built = {}

    def anchored(config, model, mesh, rules):
        ref = llama.init_params(jax.random.key(9), model)
        sh = sharding.param_shardings(ref, mesh, rules)
        built["ref"] = jax.device_get(ref)
        return probe_objective(model, inputs=sharding.shard(ref, sh), input_shardings=sh)

    monkeypatch.setitem(objectives.OBJECTIVES, "anchored", objectives.Registered(anchored))
    config = loop_config()
    config.train.objective = "anchored"
    summary = train_command.train(config, str(tmp_path))
    assert summary["step"] == 3
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    # The objective's terms are logged with the loop's metrics (catches: terms dropped).
    assert {"nll", "pos", "noise", "tokens", "anchor"} <= set(train[0])
    assert train[0]["nll"] == pytest.approx(train[0]["loss"], rel=1e-5)
    # The loop passed the frozen inputs (catches: inputs never given to the step): the
    # anchor of step 1 is |initial (masked) params - ref|^2, recomputed from the checkpoint.
    ckpt = Checkpoints(str(tmp_path), read_only=True)
    model = export.model_from_saved(ckpt.saved_model(3))
    mesh, rules = sharding.make_mesh(config.mesh), sharding.rules_from_config(config.mesh)
    opt, _ = run_setup.run_optimizer(config, anchored(config, model, mesh, rules))
    abstract = state_lib.abstract_state(model, opt, mesh, rules)
    state, _ = ckpt.restore(3, abstract, model=model)
    ckpt.close()
    rec = jax.device_get(seen(state.opt_state))
    # The optimizer-side state of the objective is checkpointed with the optimizer state,
    # and saw every step's arguments.
    assert int(rec.calls) == 3
    seed = config.train.seed
    last_key = jax.random.fold_in(state_lib._keys(seed)[1], 2)
    assert float(rec.u) == pytest.approx(float(jax.random.uniform(last_key)), abs=0)
    init = jax.device_get(llama.init_params(state_lib._keys(seed)[0], model))
    masks = jax.device_get([x for x in jax.tree.leaves(
        state.opt_state, is_leaf=lambda x: isinstance(x, KeepSparseState))
        if isinstance(x, KeepSparseState)][0].masks)
    start = jax.tree.map(lambda w, m: np.where(m, w, 0).astype(np.float32), init, masks)
    want = float(sq_dist(jax.tree.map(jnp.asarray, start), built["ref"]))
    assert train[0]["anchor"] == pytest.approx(want, rel=1e-4)


def test_unknown_objective_is_a_value_error_naming_the_choices(tmp_path):
    config = loop_config()
    config.train.objective = "distil"
    choices = sorted(objectives.OBJECTIVES)
    assert choices == ["distill", "lm", "sat", "soft_prompt"]
    with pytest.raises(ValueError, match=r"train\.objective='distil' is not one of "
                       + re.escape(str(choices))):
        train_command.train(config, str(tmp_path))
    assert not (tmp_path / "checkpoints").exists() or not any(
        (tmp_path / "checkpoints").iterdir())
