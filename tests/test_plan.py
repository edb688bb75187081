"""launch.plan: the compiler's per-device memory plan of a training step, without allocating."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import dense, sparse70
from sparse_llama.commands import plan
from sparse_llama.commands import recipe_configs as stages
from sparse_llama.ground.tree_paths import path_name
from sparse_llama.model import llama
from sparse_llama.model.config import param_count, preset
from sparse_llama.sparsity.masks import is_target

ROOT = Path(__file__).resolve().parents[1]


def test_llama2_7b_sparse_stage_plan_matches_a_hand_count_and_fits_80gb_with_full_remat():
    config = sparse70.build("full", 0.7)
    run = stages.train_config(config, "sparse50", "")
    run.model.remat = "full"
    p = plan.plan_step(run, jax.devices())
    model = preset("llama2_7b")
    n = param_count(model)
    shapes = jax.eval_shape(lambda: llama.init_params(jax.random.key(0), model))
    masked = sum(int(np.prod(w.shape)) for path, w in
                 jax.tree_util.tree_flatten_with_path(shapes)[0] if is_target(path_name(path)))
    d = p["per_device"]
    assert p["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1} and p["sparse"]
    # f32 params and gradients (and their f32 sum over the 64 micro-batches), Adam mu + nu,
    # bool masks of the target matrices: each 1/8.
    assert d["params_bytes"] == pytest.approx(4 * n / 8, rel=1e-3)
    assert d["gradients_bytes"] == pytest.approx(4 * n / 8, rel=1e-3)
    assert d["grad_accumulator_bytes"] == pytest.approx(4 * n / 8, rel=1e-3)
    assert d["optimizer_bytes"] == pytest.approx(8 * n / 8, rel=1e-3)
    assert d["masks_bytes"] == pytest.approx(masked / 8, rel=1e-3)
    state = d["params_bytes"] + d["optimizer_bytes"] + d["masks_bytes"]
    assert d["argument_bytes"] == pytest.approx(state, rel=0.01)  # + the batch's tokens
    assert p["peak_bytes_per_device"] >= d["argument_bytes"] + d["temp_bytes"]
    assert p["peak_bytes_per_device"] < 80e9  # the plan the closing note quotes
    assert p["collectives"].get("all-gather", 0) > 0  # fsdp gathers its weights


def test_a_step_that_does_not_fit_is_refitted_by_a_measured_change(monkeypatch):
    memo, real = {}, plan.plan_step

    def plan_once(run, devices):  # the base step is planned twice below: compile it once
        key = run.to_json()
        if key not in memo:
            memo[key] = real(run, devices)
        return memo[key]

    monkeypatch.setattr(plan, "plan_step", plan_once)
    config = dense.get_config("tiny")
    config.mesh.update(data=2, fsdp=4)
    config.train.update(batch_size=64, grad_accum=1)
    base = plan.plan(config, jax.devices())
    assert "fits" not in base and base["devices"] == 8
    budget = (base["peak_bytes_per_device"] - 1) / plan.GB  # just too small
    p = plan.plan(config, jax.devices(), device_memory_gb=budget)
    assert p["fits"] is False
    change = p["fits_with"]
    assert change is not None and change["peak_bytes_per_device"] < base["peak_bytes_per_device"]
    assert set(change["change"]) <= {"model.remat", "train.grad_accum", "mesh.data",
                                     "mesh.fsdp", "mesh.tensor"}


def test_the_command_plans_on_as_many_fake_devices_as_asked():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "launch.plan", "--config=configs/dense.py:tiny",
         "--num_devices=4", "--device_memory_gb=1000", "--config.train.batch_size=8"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["devices"] == 4 and out["mesh"]["data"] == 4 and out["fits"] is True
    assert 0 < out["peak_bytes_per_device"] < 1000e9


def test_bad_plans_are_refused_before_compiling():
    config = dense.get_config("tiny")
    config.train.batch_size = 6  # does not split over the 8 devices' batch axis
    with pytest.raises(ValueError, match="batch"):
        plan.plan(config, jax.devices())
    with pytest.raises(ValueError, match="device_memory_gb must be > 0"):
        plan.plan(dense.get_config("tiny"), jax.devices(), device_memory_gb=0.0)
    config = dense.get_config("tiny")
    config.train.objective = "soft_prompt"
    with pytest.raises(ValueError, match="is not planned yet"):
        plan.plan(config, jax.devices())


@pytest.mark.parametrize("value", ["0", "-2"])
def test_a_device_count_below_one_is_refused(value):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "launch.plan", "--config=configs/dense.py:tiny",
         f"--num_devices={value}"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "num_devices" in lines[0], (
        proc.stderr[-2000:])
    assert proc.stdout.strip() == ""  # nothing was planned


def test_state_and_gradient_bytes_are_the_hand_counted_shards_in_the_params_dtype():
    """bf16 params on fsdp 8: every matrix is split 8 ways along its embed axis, norms are
    whole; gradients are params-shaped in the params' dtype; with accumulation the step also
    carries a float32 sum of them (train/step.py)."""
    config = dense.get_config("tiny")
    config.model.param_dtype = "bfloat16"
    config.mesh.update(data=1, fsdp=8)
    config.data.seq_len = 32
    config.train.update(batch_size=16, grad_accum=2, steps=1)
    config.optimizer.warmup_steps = 0
    m = preset("tiny")
    d, f, v, q, k, layers = (m.hidden_size, m.intermediate_size, m.vocab_size, m.q_width,
                             m.kv_width, m.num_layers)
    matrices = v * d + layers * (2 * d * q + 2 * d * k + 3 * d * f) + (
        0 if m.tie_word_embeddings else d * v)
    norms = 2 * layers * d + d
    shard_elements = matrices // 8 + norms
    p = plan.plan_step(config, jax.devices())
    assert p["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    per = p["per_device"]
    assert per["params_bytes"] == 2 * shard_elements
    assert per["gradients_bytes"] == 2 * shard_elements  # bf16, not float32
    assert per["grad_accumulator_bytes"] == 4 * shard_elements
    assert per["optimizer_bytes"] >= 2 * 2 * shard_elements  # Adam's mu and nu (+ counts)
