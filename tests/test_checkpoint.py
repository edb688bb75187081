"""Checkpoints: exact round trip, keep-N, model identity, crash safety, donation, SIGTERM,
falling back from a damaged checkpoint (and `launch.export` doing so)."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import blocks
from sparse_llama.model import sharding
from sparse_llama.model.config import preset
from sparse_llama.optim.factory import make_optimizer
from sparse_llama.train import state as state_lib
from sparse_llama.train.checkpoint import (
    Checkpoints,
    DamagedCheckpointError,
    StopRequest,
    check_same_model,
)

ROOT = Path(__file__).resolve().parents[1]
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


def _truncate_state_files(step_dir):
    for f in (step_dir / "state").rglob("*"):
        if f.is_file() and f.name != "commit_success.txt":
            os.truncate(f, f.stat().st_size // 2)


def _truncate_largest_array_file(step_dir):
    largest = max((f for f in (step_dir / "state").rglob("*") if f.is_file()),
                  key=lambda f: f.stat().st_size)
    os.truncate(largest, largest.stat().st_size // 2)


DAMAGE = {
    "truncated state files": _truncate_state_files,
    "truncated array data": _truncate_largest_array_file,
    "state metadata deleted": lambda d: (d / "state" / "_METADATA").unlink(),
    "state item deleted": lambda d: shutil.rmtree(d / "state"),
    "truncated data state": lambda d: (d / "data" / "process_0-of-1.json").write_text('{"i":'),
    "truncated model item": lambda d: (d / "model" / "metadata").write_text('{"voc'),
}


def _two_steps(tmp_path, state, run_config=None):
    ckpt = Checkpoints(str(tmp_path), keep=3)
    for step in (1, 2):
        ckpt.save(at_step(state, step), {"i": step}, model=CFG, run_config=run_config or {})
    ckpt.wait()
    ckpt.close()
    return tmp_path / "checkpoints"


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_a_damaged_latest_checkpoint_is_named_as_damaged(tmp_path, setup, damage):
    abstract, state = setup
    directory = _two_steps(tmp_path, state)
    DAMAGE[damage](directory / "2")
    ckpt = Checkpoints(str(tmp_path), keep=3)
    with pytest.raises(DamagedCheckpointError, match="checkpoint step 2 in .* is damaged") as err:
        ckpt.restore(2, abstract, model=CFG)
    assert "optimizer" not in str(err.value)
    ckpt.close()


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path, setup, damage, caplog):
    abstract, state = setup
    directory = _two_steps(tmp_path, state)
    DAMAGE[damage](directory / "2")
    ckpt = Checkpoints(str(tmp_path), keep=3)
    with caplog.at_level(logging.WARNING):
        restored, data_state = ckpt.restore_latest(abstract, model=CFG)
    assert_same(restored, at_step(state, 1))
    assert data_state == {"i": 1}
    assert "checkpoint step 2" in caplog.text and "damaged" in caplog.text
    # Moved aside, so the run can write its step 2 again (and nothing is deleted).
    assert ckpt.all_steps() == [1]
    assert [p.name.split("-")[0] for p in (tmp_path / "checkpoints_damaged").iterdir()] == ["2"]
    assert ckpt.save(at_step(state, 2), {"i": 2}, model=CFG, run_config={})
    ckpt.wait()
    assert_same(ckpt.restore_latest(abstract, model=CFG)[0], at_step(state, 2))
    ckpt.close()


def test_restore_latest_of_an_empty_workdir_is_none(tmp_path, setup):
    abstract, _ = setup
    ckpt = Checkpoints(str(tmp_path), keep=3)
    assert ckpt.restore_latest(abstract, model=CFG) is None
    ckpt.close()


def test_every_checkpoint_damaged_is_an_error_that_keeps_them(tmp_path, setup):
    abstract, state = setup
    directory = _two_steps(tmp_path, state)
    for step in ("1", "2"):
        _truncate_state_files(directory / step)
    ckpt = Checkpoints(str(tmp_path), keep=3)
    with pytest.raises(ValueError, match=r"every checkpoint .* is damaged.*step 2.*step 1"):
        ckpt.restore_latest(abstract, model=CFG)
    assert ckpt.all_steps() == [1, 2] and not (tmp_path / "checkpoints_damaged").exists()
    ckpt.close()


def test_a_changed_optimizer_is_named_and_not_taken_for_damage(tmp_path, setup):
    abstract, state = setup
    _two_steps(tmp_path, state)
    other = blocks.optimizer()
    other.clip_norm = 0.0  # no clipping: another optimizer-state structure
    opt, _ = make_optimizer(other, total_steps=10)
    mc = blocks.mesh()
    changed = state_lib.abstract_state(CFG, opt, sharding.make_mesh(mc),
                                       sharding.rules_from_config(mc))
    assert jax.tree.structure(changed) != jax.tree.structure(abstract)
    ckpt = Checkpoints(str(tmp_path), keep=3)
    with pytest.raises(ValueError, match="did the optimizer settings change") as err:
        ckpt.restore_latest(changed, model=CFG)
    assert not isinstance(err.value, DamagedCheckpointError)
    assert ckpt.all_steps() == [1, 2] and not (tmp_path / "checkpoints_damaged").exists()
    ckpt.close()


def _export_cli(workdir, out_dir):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    return subprocess.run([sys.executable, "-m", "launch.export", f"--workdir={workdir}",
                           f"--out_dir={out_dir}"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


EXPORT_RUN_CONFIG = {"mesh": blocks.mesh().to_dict(), "optimizer": blocks.optimizer().to_dict(),
                     "train": {"steps": 10}, "model": {"param_dtype": "float32"}}


def test_export_skips_a_damaged_latest_checkpoint(tmp_path, setup):
    from sparse_llama.model import hf_io

    _, state = setup
    directory = _two_steps(tmp_path, state, EXPORT_RUN_CONFIG)
    _truncate_state_files(directory / "2")
    proc = _export_cli(tmp_path, tmp_path / "hf")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["step"] == 1
    assert "checkpoint step 2" in proc.stderr and "damaged" in proc.stderr
    _, params = hf_io.load_hf(tmp_path / "hf")
    assert_same(params, at_step(state, 1).params)
    assert sorted(p.name for p in directory.iterdir()) == ["1", "2"]  # read-only: left alone


def test_a_damaged_latest_checkpoint_is_one_warning_line_and_no_loop_tracebacks(tmp_path, setup):
    # The aborted asynchronous read of the damaged step used to leave one "Event loop is
    # closed" traceback per array still in flight (dozens on a real model) after the fallback.
    _, state = setup
    directory = _two_steps(tmp_path, state, EXPORT_RUN_CONFIG)
    _truncate_largest_array_file(directory / "2")
    proc = _export_cli(tmp_path, tmp_path / "hf")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # (orbax may still log its own "Task exception was never retrieved" for the failed read:
    # issue left open in the closing note)
    assert "Event loop is closed" not in proc.stderr
    damaged = [line for line in proc.stderr.splitlines() if "is damaged" in line]
    assert len(damaged) == 1 and "checkpoint step 2" in damaged[0], proc.stderr[-3000:]
    assert "using checkpoint step 1 instead" in damaged[0]


def test_export_with_every_checkpoint_damaged_is_a_one_line_error(tmp_path, setup):
    _, state = setup
    directory = _two_steps(tmp_path, state, EXPORT_RUN_CONFIG)
    for step in ("1", "2"):
        _truncate_state_files(directory / step)
    proc = _export_cli(tmp_path, tmp_path / "hf")
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: every checkpoint") and "step 2" in last and "step 1" in last
    assert "Traceback" not in proc.stderr and "{" not in proc.stdout
    assert not (tmp_path / "hf").exists()


# ---- the sparse export (sparse_io/sparse_export.py: a sparse run's export, launch.export) ----

def _sparse_model(seed=0):
    from sparse_llama.model import llama
    from sparse_llama.sparsity.static import static_masks

    params = jax.device_get(llama.init_params(jax.random.key(seed), CFG))
    masks = jax.device_get(static_masks(params, "magnitude", 0.5, jax.random.key(1)))
    return jax.tree.map(lambda w, m: np.where(m, w, 0).astype(w.dtype), params, masks), masks


@pytest.mark.parametrize("dtype, tiny", [("float16", 1e-9), ("bfloat16", 1e-42)])
def test_the_sparsity_report_counts_the_weights_as_written(tmp_path, dtype, tiny):
    """Kept weights too small for the export dtype are written as 0: the report counts them."""
    from sparse_llama.model import hf_io
    from sparse_llama.sparse_io.sparse_export import save_sparse_hf

    params, masks = _sparse_model()
    up = np.array(params["layers"]["mlp"]["up_proj"])
    kept = np.argwhere(np.asarray(masks["layers"]["mlp"]["up_proj"]))[:100]
    up[tuple(kept.T)] = tiny  # kept, nonzero in float32, 0 once cast
    params["layers"]["mlp"]["up_proj"] = up
    out, report = save_sparse_hf(params, CFG, tmp_path / "out", masks=masks, dtype=dtype)
    assert json.loads((out / "sparsity_report.json").read_text()) == report
    _, written = hf_io.load_hf(out)
    w = np.asarray(written["layers"]["mlp"]["up_proj"])
    entry = {(t["name"], t["layer"]): t["sparsity"] for t in report["per_tensor"]}
    for layer in range(CFG.num_layers):
        assert entry["mlp/up_proj", layer] == np.mean(w[layer] == 0)
    assert entry["mlp/up_proj", 0] > 0.5  # the underflowed weights count as zeros
    linears = [np.asarray(x) for k, v in written["layers"].items() if "norm" not in k
               for x in v.values()]
    zeros, total = sum(int(np.sum(x == 0)) for x in linears), sum(x.size for x in linears)
    assert report["overall"] == zeros / total


def test_a_sparse_export_that_overflows_float16_publishes_nothing(tmp_path):
    from sparse_llama.sparse_io.sparse_export import save_sparse_hf

    params, masks = _sparse_model()
    down = np.array(params["layers"]["mlp"]["down_proj"])
    down[1][np.unravel_index(np.argmax(np.abs(down[1])), down[1].shape)] = 1e5
    params["layers"]["mlp"]["down_proj"] = down
    with pytest.raises(ValueError, match=r"^model\.layers\.1\.mlp\.down_proj\.weight: 1 value "
                                         r"is not finite in float16") as err:
        save_sparse_hf(params, CFG, tmp_path / "out", masks=masks, dtype="float16")
    assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []
