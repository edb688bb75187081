"""Checkpoints: exact round trip, keep-N, model identity, crash safety, donation, SIGTERM."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import blocks
from sparse_llama.model import sharding
from sparse_llama.model.config import preset
from sparse_llama.optim.factory import make_optimizer
from sparse_llama.train import state as state_lib
from sparse_llama.train.checkpoint import Checkpoints, StopRequest, check_same_model

CFG = preset("tiny").replace(vocab_size=64, max_position_embeddings=32)


@pytest.fixture(scope="module")
def setup():
    mc = blocks.mesh()
    mesh, rules = sharding.make_mesh(mc), sharding.rules_from_config(mc)
    opt, _ = make_optimizer(blocks.optimizer(), total_steps=10)
    abstract = state_lib.abstract_state(CFG, opt, mesh, rules)
    state = state_lib.init_state(CFG, opt, mesh, rules, seed=1)
    return abstract, state


def at_step(state, step):
    """A copy of `state` at `step`, its params perturbed so different steps differ."""
    return state._replace(step=jnp.asarray(step, jnp.int32),
                          params=jax.tree.map(lambda w: w + step, state.params))


def assert_same(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_round_trip_is_exact_and_keeps_data_state_and_config(tmp_path, setup):
    abstract, state = setup
    ckpt = Checkpoints(str(tmp_path), keep=3)
    data_state = {"parent": {"index": 17, "epoch": [0, 1]}, "offset": 5}
    ckpt.save(at_step(state, 4), data_state, model=CFG, run_config={"train": {"steps": 9}})
    ckpt.wait()
    assert ckpt.latest_step() == 4
    restored, restored_data = ckpt.restore(4, abstract, model=CFG)
    assert_same(restored, at_step(state, 4))
    assert restored.params["embed_tokens"].sharding == abstract.params["embed_tokens"].sharding
    assert restored_data == data_state
    assert ckpt.saved_config(4) == {"train": {"steps": 9}}
    # Execution settings may change between runs of the same model.
    ckpt.restore(4, abstract, model=CFG.replace(dtype="bfloat16", scan_layers=True))
    ckpt.close()


def test_keeps_only_the_newest_checkpoints(tmp_path, setup):
    _, state = setup
    ckpt = Checkpoints(str(tmp_path), keep=2)
    for step in (1, 2, 3, 4):
        ckpt.save(at_step(state, step), {}, model=CFG, run_config={})
    ckpt.wait()
    assert ckpt.all_steps() == [3, 4]
    assert not ckpt.save(at_step(state, 4), {}, model=CFG, run_config={})  # already there
    ckpt.close()


def test_refuses_a_checkpoint_of_another_model(tmp_path, setup):
    abstract, state = setup
    ckpt = Checkpoints(str(tmp_path), keep=1)
    ckpt.save(at_step(state, 1), {}, model=CFG, run_config={})
    ckpt.wait()
    other = CFG.replace(num_layers=3)
    with pytest.raises(ValueError, match=r"another model \(num_layers: checkpoint 2 vs run 3"):
        ckpt.restore(1, abstract, model=other)
    with pytest.raises(ValueError, match="use a new --workdir"):
        check_same_model(ckpt.saved_model(1), CFG.replace(vocab_size=65), "here")
    ckpt.close()


def test_saving_is_safe_against_the_next_donating_step(tmp_path, setup):
    abstract, state = setup
    state = at_step(state, 2)
    expected = jax.device_get(state)
    ckpt = Checkpoints(str(tmp_path), keep=1)
    ckpt.save(state, {}, model=CFG, run_config={})
    bump = jax.jit(lambda s: jax.tree.map(lambda x: x + 1, s), donate_argnums=0)
    bumped = bump(state)  # overwrites the saved buffers while the write may be in flight
    ckpt.wait()
    restored, _ = ckpt.restore(2, abstract, model=CFG)
    assert_same(restored, expected)
    del bumped
    ckpt.close()


def test_leftover_temporary_directories_are_not_checkpoints(tmp_path, setup):
    abstract, state = setup
    ckpt = Checkpoints(str(tmp_path), keep=3)
    ckpt.save(at_step(state, 1), {}, model=CFG, run_config={})
    ckpt.wait()
    ckpt.close()
    # What a crash in the middle of writing step 2 leaves behind.
    tmp = tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp-1234567"
    (tmp / "state").mkdir(parents=True)
    (tmp / "state" / "partial").write_bytes(b"\0" * 10)
    ckpt = Checkpoints(str(tmp_path), keep=3)
    assert ckpt.latest_step() == 1
    ckpt.save(at_step(state, 2), {}, model=CFG, run_config={})  # the step is redone cleanly
    ckpt.wait()
    assert not tmp.exists()
    assert ckpt.all_steps() == [1, 2]
    ckpt.restore(2, abstract, model=CFG)
    ckpt.close()


def test_a_process_killed_during_an_async_save_leaves_no_broken_checkpoint(tmp_path):
    script = textwrap.dedent(f"""
        import os
        import jax, jax.numpy as jnp
        from sparse_llama.model.config import preset
        from sparse_llama.train.checkpoint import Checkpoints
        from sparse_llama.train.state import TrainState
        big = {{"w": jnp.ones((64, 1024, 1024), jnp.float32)}}  # 256 MiB: slow to write
        state = TrainState(jnp.asarray(1), {{"w": jnp.ones((4,))}}, (), jnp.zeros(2, jnp.uint32))
        ckpt = Checkpoints({str(tmp_path)!r}, keep=3)
        ckpt.save(state, {{"i": 1}}, model=preset("tiny"), run_config={{}})
        ckpt.wait()
        ckpt.save(TrainState(jnp.asarray(2), big, (), state.rng), {{"i": 2}},
                  model=preset("tiny"), run_config={{}})
        os._exit(9)  # dies while step 2 is being written in the background
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr[-2000:]
    leftovers = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    ckpt = Checkpoints(str(tmp_path), keep=3)
    steps = ckpt.all_steps()
    # Step 2 died in its temporary directory; only the complete step 1 is a checkpoint.
    assert any(name.startswith("2.orbax-checkpoint-tmp") for name in leftovers), leftovers
    assert steps == [1]
    data_file = tmp_path / "checkpoints" / "1" / "data" / "process_0-of-1.json"
    assert json.loads(data_file.read_text()) == {"i": 1}
    ckpt.close()


def test_data_state_of_another_process_count_is_refused(tmp_path, setup):
    abstract, state = setup
    ckpt = Checkpoints(str(tmp_path), keep=1)
    ckpt.save(at_step(state, 1), {"i": 1}, model=CFG, run_config={})
    ckpt.wait()
    data_dir = tmp_path / "checkpoints" / "1" / "data"
    os.rename(data_dir / "process_0-of-1.json", data_dir / "process_0-of-2.json")
    with pytest.raises(ValueError, match="process count"):
        ckpt.restore(1, abstract, model=CFG)
    ckpt.close()


def test_sigterm_requests_a_stop_and_the_handler_is_restored():
    before = signal.getsignal(signal.SIGTERM)
    with StopRequest() as stop:
        assert not stop.should_stop(1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.should_stop(2)
    assert signal.getsignal(signal.SIGTERM) == before
