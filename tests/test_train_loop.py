"""The training loop in-process: exact resume, divergence, refusals, config checks, outputs."""

import json
import os

import jax
import numpy as np
import pytest

from configs import dense
from sparse_llama import objectives
from sparse_llama.commands import export as export_command
from sparse_llama.commands import train as train_command
from sparse_llama.data.tokenizer import default_tokenizer
from sparse_llama.model import hf_io, sharding
from sparse_llama.optim.factory import make_optimizer
from sparse_llama.train import export, loop, run_setup
from sparse_llama.train import state as state_lib
from sparse_llama.train.checkpoint import Checkpoints, StopRequest


def small_config(steps=6):
    """The tiny variant cut down to seconds: 8 rows of 32 tokens, one eval batch."""
    config = dense.get_config("tiny")
    config.data.seq_len = 32
    config.train.update(steps=steps, batch_size=8, log_every=1, eval_every=0, eval_batches=1,
                        checkpoint_every=3, keep_checkpoints=5)
    config.optimizer.warmup_steps = 2
    return config


class StopAt(StopRequest):
    """A SIGTERM that arrives while step `at` runs."""

    def __init__(self, at):
        super().__init__()
        self.at = at

    def should_stop(self, step):
        return step >= self.at or super().should_stop(step)


def final_state(workdir, config):
    """(step, state, data state) of the newest checkpoint of a workdir, restored on the host
    with the optimizer the run built (keep-sparse, the objective's own transformation)."""
    ckpt = Checkpoints(str(workdir), read_only=True)
    step = ckpt.latest_step()
    model = export.model_from_saved(ckpt.saved_model(step))
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.rules_from_config(config.mesh)
    opt, _ = run_setup.run_optimizer(config, objectives.build(config, model, mesh, rules))
    abstract = state_lib.abstract_state(model, opt, mesh, rules)
    state, data_state = ckpt.restore(step, abstract, model=model)
    ckpt.close()
    return step, jax.device_get(state), data_state


def train_records(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """Six steps in one go (shared by several tests)."""
    workdir = tmp_path_factory.mktemp("straight")
    config = small_config()
    summary = train_command.train(config, str(workdir))
    return workdir, config, summary


def test_stop_and_resume_is_bit_exact(straight_run, tmp_path):
    workdir, config, summary = straight_run
    first = train_command.train(config, str(tmp_path), stop=StopAt(3))
    assert first["stopped"] and first["step"] == 3
    assert not (tmp_path / "hf").exists()  # exported only when training is complete
    second = train_command.train(config, str(tmp_path))
    assert second["step"] == 6 and "stopped" not in second
    step_a, state_a, data_a = final_state(workdir, config)
    step_b, state_b, data_b = final_state(tmp_path, config)
    assert step_a == step_b == 6
    jax.tree.map(np.testing.assert_array_equal, state_a, state_b)  # bit for bit
    assert data_a == data_b  # the data iterators stand at the same place
    # ... and they read the same batches: identical losses at every step.
    losses_a = {r["step"]: r["loss"] for r in train_records(workdir)}
    losses_b = {r["step"]: r["loss"] for r in train_records(tmp_path)}
    assert losses_a == losses_b and sorted(losses_a) == [1, 2, 3, 4, 5, 6]
    assert second["loss"] == summary["loss"]
    assert second["eval_perplexity"] == summary["eval_perplexity"]


def test_outputs_of_a_run(straight_run):
    workdir, _, summary = straight_run
    assert set(summary) >= {"step", "loss", "eval_perplexity", "tokens_per_s", "workdir"}
    assert summary["step"] == 6 and np.isfinite(summary["loss"])
    assert 1 < summary["eval_perplexity"] < 1000 and summary["tokens_per_s"] > 0
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert {"loss", "lr", "grad_norm", "param_norm", "tokens"} <= set(train[0])
    assert "tokens_per_s" in train[-1]
    evals = [r for r in records if r["kind"] == "eval"]
    assert evals[-1]["step"] == 6 and evals[-1]["perplexity"] == summary["eval_perplexity"]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir / "tensorboard"))
    assert (workdir / "tokenizer" / "tokenizer.json").is_file()
    # The end-of-run export and a later `launch.export` of the last checkpoint agree.
    config, params = hf_io.load_hf(workdir / "hf")
    assert config.vocab_size == default_tokenizer(512).vocab_size
    again = export_command.export_workdir(str(workdir), str(workdir / "hf_again"))
    assert again["step"] == 6
    _, params_again = hf_io.load_hf(again["hf_dir"])
    jax.tree.map(np.testing.assert_array_equal, params, params_again)


def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real = loop.make_train_step

    def poisoned(*args, **kwargs):
        step = real(*args, **kwargs)

        def run(state, batch):
            state, metrics = step(state, batch)
            if int(state.step) == 5:  # the loss of the 5th update comes out NaN
                metrics = dict(metrics, loss=metrics["loss"] * np.nan)
            return state, metrics
        return run

    monkeypatch.setattr(loop, "make_train_step", poisoned)
    with pytest.raises(loop.TrainingDivergedError,
                       match=r"diverged at step 5: \{'loss': nan\}.*last good checkpoint is "
                             r"step 3"):
        train_command.train(small_config(), str(tmp_path))
    assert Checkpoints(str(tmp_path), read_only=True).all_steps() == [3]
    assert not (tmp_path / "hf").exists()


def test_refuses_a_workdir_holding_another_models_checkpoint(tmp_path):
    config = small_config()
    other = run_setup.resolve_model_config(config, default_tokenizer(512)).replace(num_layers=1)
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.rules_from_config(config.mesh)
    opt, _ = make_optimizer(config.optimizer, 6)
    state = state_lib.init_state(other, opt, mesh, rules, seed=0)
    ckpt = Checkpoints(str(tmp_path), keep=1)
    ckpt.save(state, [], model=other, run_config={})
    ckpt.close()
    with pytest.raises(ValueError, match=r"another model \(num_layers: checkpoint 1 vs run 2\)"):
        train_command.train(config, str(tmp_path))


def test_seq_len_beyond_the_context_is_refused(tmp_path):
    config = small_config()
    config.data.seq_len = 1024  # the tiny preset has 512 positions
    with pytest.raises(ValueError, match=r"data.seq_len=1024 exceeds the model's context of "
                                         r"512"):
        train_command.train(config, str(tmp_path))


def test_a_tokenizer_larger_than_the_models_vocabulary_is_refused(tmp_path):
    from tests import hf_fixtures

    hf_dir = hf_fixtures.save_hf_checkpoint(hf_fixtures.build_hf_model(), tmp_path / "hf")
    config = small_config()
    config.model.hf_path = str(hf_dir)  # vocab 101
    config.data.tokenizer_path = str(default_tokenizer(512).save(tmp_path / "tok"))
    with pytest.raises(ValueError, match=r"tokenizer has \d+ ids but the model's embedding "
                                         r"has only 101 rows"):
        train_command.train(config, str(tmp_path / "run"))


@pytest.mark.parametrize("key, value, message", [
    ("train.steps", 0, "train.steps must be an integer >= 1"),
    ("train.grad_accum", 3, "must be a multiple of train.grad_accum=3"),
    ("optimizer.lr", -1.0, "optimizer.lr must be a positive number"),
    ("optimizer.min_lr_ratio", 2.0, r"optimizer.min_lr_ratio must be in \[0.0, 1\]"),
    ("optimizer.warmup_steps", 100, "warmup_steps=100 exceeds train.steps=6"),
    ("train.batch_size", 12, "do not split over the 8 devices"),
    ("train.data_shards", 3, "does not split into 3 data shards"),
])
def test_invalid_values_are_named_with_their_fix(tmp_path, key, value, message):
    config = small_config()
    section, name = key.split(".")
    config[section][name] = value
    with pytest.raises(ValueError, match=message):
        train_command.train(config, str(tmp_path))
    assert not (tmp_path / "checkpoints").exists() or not os.listdir(tmp_path / "checkpoints")
