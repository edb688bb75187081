"""SAT through the loop: a run stopped inside a ladder rung resumes on that rung with the
same selections (bit-identical params and per-unit kept counts as an uninterrupted run), and
the omission rate of every step is logged."""

import json

import jax
import numpy as np
from test_train_loop import StopAt, final_state

from configs import sat_cpt
from sparse_llama.commands import export as export_command
from sparse_llama.commands import train as train_command
from sparse_llama.model import hf_io
from sparse_llama.optim.sat import find_sat_state


def config():
    c = sat_cpt.get_config("tiny")
    c.data.seq_len = 16
    c.train.update(steps=4, batch_size=8, log_every=1, eval_every=0, eval_batches=0,
                   checkpoint_every=0, export_hf=False)
    c.optimizer.warmup_steps = 1
    # No constant stage: updates 0-1 on rung 1 (MLP rate 0.25), 2-3 on rung 2 (dense).
    c.sat.update(metric="wanda", head_rate=0.5)
    c.sat.lors.update(constant_fraction=0.0, rungs=2)
    return c


def rates(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["sat_mlp_rate"] for r in map(json.loads, lines)
            if r["kind"] == "train"}


def test_resume_lands_on_the_same_rung_and_selections(tmp_path):
    cfg = config()
    full, split = tmp_path / "full", tmp_path / "split"
    assert train_command.train(cfg, str(full))["step"] == 4
    assert train_command.train(cfg, str(split), stop=StopAt(1))["stopped"]
    assert train_command.train(cfg, str(split))["step"] == 4
    a, b = final_state(full, cfg)[1], final_state(split, cfg)[1]
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_array_equal(x, y)
    sa, sb = find_sat_state(a.opt_state), find_sat_state(b.opt_state)
    np.testing.assert_array_equal(sa.mlp_kept_steps, sb.mlp_kept_steps)
    np.testing.assert_array_equal(sa.group_kept_steps, sb.group_kept_steps)
    # Rung 1 kept 132 of 176 channels and 1 of 2 groups per layer on 2 updates, then dense;
    # two sampled steps kept different channels (the counts are not all 0 or 2 + 2).
    assert int(sa.count) == 4
    np.testing.assert_array_equal(sa.mlp_kept_steps.sum(1), [2 * 132 + 2 * 176] * 2)
    np.testing.assert_array_equal(sa.group_kept_steps.sum(1), [2 * 1 + 2 * 2] * 2)
    assert np.any(sa.mlp_kept_steps == 3)
    assert rates(full) == {1: 0.25, 2: 0.25, 3: 0.0, 4: 0.0}
    assert rates(split) == {1: 0.25, 2: 0.25, 3: 0.0, 4: 0.0}
    # `launch.export` of a SAT workdir: its params alone, without SAT's optimizer wrapper.
    out = export_command.export_workdir(str(full))
    assert out["step"] == 4
    _, exported = hf_io.load_hf(out["hf_dir"])
    for x, y in zip(jax.tree.leaves(exported), jax.tree.leaves(a.params), strict=True):
        np.testing.assert_array_equal(x, y)
