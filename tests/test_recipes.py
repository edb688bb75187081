"""Staged recipes (commands/recipe.py) as a user runs them: `python -m launch.train
--config=configs/sparse70.py:tiny`. Refusals are one `error:` line with exit status 2 before the
workdir exists; the tiny recipe, cut to seconds, runs every stage, reruns as a no-op and resumes
a stage killed half-way from that stage's own checkpoint."""

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from sparse_llama.ground.tree_paths import path_name
from sparse_llama.model import hf_io
from sparse_llama.sparse_io import mask_io
from sparse_llama.sparsity.masks import is_target

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "HF_HUB_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1"}
STAGES = ["dense", "prune50", "sparse50", "prune70", "sparse70", "eval_final", "export"]
PNG = b"\x89PNG\r\n\x1a\n"


def shrunk() -> list[str]:
    """configs/sparse70.py:tiny with every budget cut: 8 x 32-token steps (dense 4 steps,
    sparse50 2, sparse70 4 with checkpoints every 2), 8 calibration windows of 32 tokens, a
    20k-character eval text. Pruning by magnitude: SparseGPT's first compile alone costs more
    than the rest of the recipe on a CPU, and the solver has its own tests (test_sparsegpt,
    test_prune_cli); the stage machinery under test here is the same for every method."""
    flags = ["--config.data.seq_len=32", "--config.eval.seq_len=32",
             "--config.eval.max_chars=20000",
             "--config.dense.tokens=1024", "--config.sparse50.tokens=512",
             "--config.sparse70.tokens=1024"]
    for stage in ("dense", "sparse50", "sparse70"):
        flags += [f"--config.{stage}.train.batch_size=8",
                  f"--config.{stage}.optimizer.warmup_steps=1",
                  f"--config.{stage}.train.checkpoint_every=2",
                  f"--config.{stage}.train.log_every=1"]
    for stage in ("prune50", "prune70"):
        flags += [f"--config.{stage}.calibration.num_samples=8",
                  f"--config.{stage}.calibration.seq_len=32",
                  f"--config.{stage}.pruning.method=magnitude"]
    return flags


def launch(workdir, *flags) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.train",
                           "--config=configs/sparse70.py:tiny", f"--workdir={workdir}", *flags],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)


def last_json(proc) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("flags, message", [
    (["--config.prune50.kind=distill"],
     r"config\.prune50\.kind='distill' is not a stage kind; use one of \['eval', 'export', "
     r"'prune', 'soft_prompt', 'train'\]"),
    (["--config.stages=('dense', 'prune50', 'sparse60')"],
     r"stage 'sparse60' of config\.stages has no config\.sparse60 section"),
    (["--config.sparse50.tokens=0"], r"config\.sparse50\.tokens=0 must be a positive token "),
    (["--config.sparse70.tokens=-5"],
     r"config\.sparse70\.tokens=-5 must be a positive token budget"),
    # The message must name the key to raise (catches an unformatted "config.{name}").
    (["--config.prune70.pruning.sparsity=0.4"],
     r"prune stage 'prune70' asks for sparsity 0\.4, below the 0\.5 an earlier stage reached;"
     r".*raise config\.prune70\.pruning\.sparsity"),
    (["--config.stages=('sparse50', 'eval_final')"],
     r"stage 'sparse50' trains sparse but no earlier stage made a sparse model"),
], ids=["unknown_kind", "no_section", "zero_tokens", "negative_tokens", "prune_below_earlier",
        "sparse_without_start"])
def test_bad_recipes_are_one_line_errors_before_the_workdir_exists(tmp_path, flags, message):
    workdir = tmp_path / "run"
    proc = launch(workdir, *flags)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    assert re.search(message, lines[0]), lines[0]
    assert proc.stdout.strip() == ""  # no summary line
    assert not workdir.exists()  # refused before anything was created


def targets(params) -> dict:
    return {path_name(p): np.asarray(w) for p, w in jax.tree_util.tree_flatten_with_path(params)[0]
            if is_target(path_name(p))}


def counted_sparsity(params) -> float:
    leaves = targets(params).values()
    return sum(int(np.sum(w == 0)) for w in leaves) / sum(w.size for w in leaves)


def file_times(workdir: Path) -> dict:
    return {str(p.relative_to(workdir)): p.stat().st_mtime_ns for p in workdir.rglob("*")
            if p.is_file() and p.suffix != ".png"}


def train_steps(metrics: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, metrics.read_text().splitlines())
            if r["kind"] == "train"]


def test_tiny_recipe_runs_reruns_as_a_no_op_and_resumes_a_killed_stage(tmp_path):
    # One test, in order: the rerun and the resume act on the first run's workdir.
    workdir = tmp_path / "recipe"
    proc = launch(workdir, *shrunk())
    summary = last_json(proc)

    # -- the first run: every stage, in order, with its measurements --
    records = {r["name"]: r for r in summary["stages"]}
    assert [r["name"] for r in summary["stages"]] == STAGES
    assert all(set(r) == {"name", "sparsity", "perplexity", "tokens", "seconds"}
               for r in summary["stages"])
    expected = {"dense": 0.0, "prune50": 0.5, "sparse50": 0.5, "prune70": 0.7, "sparse70": 0.7,
                "eval_final": 0.7, "export": 0.7}
    for name, want in expected.items():
        assert records[name]["sparsity"] == pytest.approx(want, abs=2e-3), name
        assert math.isfinite(records[name]["perplexity"]) and records[name]["perplexity"] > 1
    # Token budgets became steps: tokens / (8 x 32) steps, reported as trained tokens.
    assert [records[n]["tokens"] for n in ("dense", "sparse50", "sparse70")] == [1024, 512, 1024]
    assert records["prune50"]["tokens"] == 8 * 32
    assert summary["hf_dir"] == str(workdir / "export" / "hf")

    # Sparsity counted from each stage's weights agrees with its record (catches a record
    # copied from the config's target instead of measured).
    zeros = {}
    for name in ("dense", "prune50", "sparse50", "prune70", "sparse70"):
        _, params = hf_io.load_hf(workdir / name / "hf")
        assert counted_sparsity(params) == pytest.approx(records[name]["sparsity"], abs=1e-9)
        zeros[name] = {k: w == 0 for k, w in targets(params).items()}
    for k in zeros["prune50"]:
        # sparse50 kept prune50's mask exactly; prune70 kept sparse50's zeros (keep_zeros);
        # sparse70 kept prune70's mask exactly.
        np.testing.assert_array_equal(zeros["sparse50"][k], zeros["prune50"][k], err_msg=k)
        assert np.all(zeros["prune70"][k][zeros["sparse50"][k]]), k
        np.testing.assert_array_equal(zeros["sparse70"][k], zeros["prune70"][k], err_msg=k)

    # The final directory: exact zeros where its masks prune, masks and report beside them.
    final = Path(summary["hf_dir"])
    _, params = hf_io.load_hf(final)
    masks = mask_io.load_masks(final / "masks", params)
    for k, m in targets(masks).items():
        assert np.all(targets(params)[k][~m] == 0) and m.mean() == pytest.approx(0.3, abs=2e-3)
    assert (final / "sparsity_report.json").is_file()

    # The plots are real PNGs.
    for plot in ("loss.png", "sparsity.png"):
        assert (workdir / plot).read_bytes()[:8] == PNG, plot
        assert (workdir / plot).stat().st_size > 5000, plot

    # -- the same command again: nothing is redone --
    before = file_times(workdir)
    proc = launch(workdir, *shrunk())
    again = last_json(proc)
    assert again == summary  # same records, read back from stage.json
    for name in STAGES:
        assert f"[{name}] done earlier" in proc.stdout, name
    assert file_times(workdir) == before  # no checkpoint, export or record was rewritten

    # -- a run killed inside sparse70 (after its step-2 checkpoint): the rerun resumes there --
    sparse70 = workdir / "sparse70"
    _, finished = hf_io.load_hf(sparse70 / "hf")
    assert sorted(os.listdir(sparse70 / "checkpoints")) == ["2", "4"]
    for record in ("sparse70", "eval_final", "export"):
        (workdir / record / "stage.json").unlink()
    shutil.rmtree(sparse70 / "hf")
    shutil.rmtree(sparse70 / "checkpoints" / "4")
    earlier = {n: (workdir / n / "stage.json").stat().st_mtime_ns for n in STAGES[:4]}
    proc = launch(workdir, *shrunk())
    resumed = last_json(proc)
    for name in STAGES[:4]:
        assert f"[{name}] done earlier" in proc.stdout, name
        assert (workdir / name / "stage.json").stat().st_mtime_ns == earlier[name], name
    # Steps 3 and 4 were trained again, steps 1 and 2 were not (catches a restart of the
    # stage from its start model).
    assert train_steps(sparse70 / "metrics.jsonl") == [1, 2, 3, 4, 3, 4]
    _, params = hf_io.load_hf(sparse70 / "hf")
    jax.tree.map(np.testing.assert_array_equal, params, finished)  # resume is exact
    assert [r["name"] for r in resumed["stages"]] == STAGES
    for a, b in zip(resumed["stages"], summary["stages"], strict=True):
        assert a["sparsity"] == b["sparsity"] and a["perplexity"] == pytest.approx(
            b["perplexity"], rel=1e-6), a["name"]


def test_mediswift_recipe_ends_with_a_soft_prompt_for_the_fine_tuned_model(tmp_path):
    from configs import mediswift
    from sparse_llama.commands import recipe as stages

    config = mediswift.get_config("tiny")
    config.data.seq_len = config.eval.seq_len = 32
    config.eval.max_chars = 20000
    for name, tokens in (("sparse_pretrain", 1024), ("dense_finetune", 512), ("prompt", 512)):
        config[name].tokens = tokens
        config[name].train.batch_size = 8
        config[name].optimizer.warmup_steps = 1
    config.prompt.soft_prompt.num_tokens = 4
    summary = stages.run(config, str(tmp_path / "ms"))
    records = {r["name"]: r for r in summary["stages"]}
    assert list(records) == ["sparse_pretrain", "dense_finetune", "prompt"]
    assert records["sparse_pretrain"]["sparsity"] == pytest.approx(0.75, abs=2e-3)
    assert records["dense_finetune"]["sparsity"] < 0.01  # the mask was released
    # The prompt stage leaves the model as it was; its perplexity is the model's with the
    # prompt (a different number from the same model's without it).
    assert summary["hf_dir"] == str(tmp_path / "ms" / "dense_finetune" / "hf")
    assert records["prompt"]["sparsity"] == records["dense_finetune"]["sparsity"]
    assert records["prompt"]["perplexity"] != pytest.approx(
        records["dense_finetune"]["perplexity"], rel=1e-4)
    record = json.loads((tmp_path / "ms" / "prompt" / "stage.json").read_text())
    assert Path(record["soft_prompt"]).is_file()


class StageStarted(Exception):
    """Raised by the stubbed stages and measurement: the recipe got past its checks."""


@pytest.fixture
def no_stages(monkeypatch):
    """recipe.run with every stage (and the start's measurement) replaced by a stub that
    raises StageStarted: a refusal must come before it; a valid recipe reaches it."""
    from sparse_llama.commands import recipe

    def started(*args, **kwargs):
        raise StageStarted

    for kind in recipe.STAGE_KINDS:
        monkeypatch.setitem(recipe.STAGE_KINDS, kind, started)
    monkeypatch.setattr(recipe, "measure", started)
    return recipe


def tiny_recipe(**changes):
    """configs/sparse70.py:tiny with `changes` ("section.key": value)."""
    from configs import sparse70

    config = sparse70.get_config("tiny")
    for key, value in changes.items():
        *sections, leaf = key.split(".")
        node = config
        for s in sections:
            node = node[s]
        node[leaf] = value
    return config


def without(src, tmp_path, *names) -> str:
    """A copy of checkpoint directory `src` without the entries `names`."""
    dst = tmp_path / f"copy-{Path(src).name}-{'-'.join(names)}"
    shutil.copytree(src, dst, ignore=lambda d, entries: [e for e in entries if e in names])
    return str(dst)


def test_a_sparse_stage_on_a_dense_start_is_refused_with_the_measured_sparsity(
        no_stages, finetune_dirs, tmp_path):
    dense_dir, sparse_dir, _, _ = finetune_dirs
    workdir = tmp_path / "run"
    # The dense start is refused, naming the path, its measured sparsity and the fix.
    config = tiny_recipe(**{"model.hf_path": dense_dir})
    config.stages = ("dense", "sparse50", "eval_final")  # dense is skipped: sparse50 is first
    with pytest.raises(ValueError, match=re.escape(dense_dir) + r".*0\.000.*prune stage"):
        no_stages.run(config, str(workdir))
    assert not workdir.exists()
    # A pruned start passes: from its masks file, and from its exact zeros without one.
    for start in (sparse_dir, without(sparse_dir, tmp_path, "masks", "sparsity_report.json")):
        config.model.hf_path = start
        with pytest.raises(StageStarted):
            no_stages.run(config, str(tmp_path / "ok"))


def test_the_start_sparsity_is_read_from_masks_or_zeros_without_loading(finetune_dirs, tmp_path,
                                                                         monkeypatch):
    from sparse_llama.commands import recipe, recipe_checks
    from sparse_llama.train.sparse_start import target_sparsity

    dense_dir, sparse_dir, _, _ = finetune_dirs
    counted = {d: target_sparsity(hf_io.load_hf(d)[1]) for d in (dense_dir, sparse_dir)}
    assert counted[dense_dir] == 0.0 and counted[sparse_dir] == pytest.approx(0.7, abs=2e-3)
    monkeypatch.setattr(recipe.loading, "load_model", None)  # nothing is loaded whole
    zeros_only = without(sparse_dir, tmp_path, "masks", "sparsity_report.json")
    for hf_dir, want, source in ((dense_dir, counted[dense_dir], "exact zeros"),
                                 (sparse_dir, counted[sparse_dir], "masks"),
                                 (zeros_only, counted[sparse_dir], "exact zeros")):
        sparsity, read_from = recipe_checks.checkpoint_sparsity(hf_dir)
        assert sparsity == pytest.approx(want, abs=1e-12), hf_dir
        assert source in read_from, read_from


def test_every_stage_is_checked_before_the_first_runs(no_stages, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("a few words only")
    cases = [
        ({"export.dtype": "float8"}, r"config\.export\.dtype"),
        ({"eval.seq_len": 4096}, r"eval\.seq_len=4096 exceeds the model's context of 512"),
        ({"data.seq_len": 1024}, r"data\.seq_len=1024 exceeds the model's context of 512"),
        ({"prune70.calibration.seq_len": 1024},
         r"calibration\.seq_len=1024 exceeds the model's context of 512"),
        ({"data.eval_path": str(short)}, r"fewer than one window of eval\.seq_len=128"),
    ]
    for changes, message in cases:
        workdir = tmp_path / "run"
        with pytest.raises(ValueError, match=message):
            no_stages.run(tiny_recipe(**changes), str(workdir))
        assert not workdir.exists(), changes


def test_prune_stages_are_checked_against_their_own_stage_directory(no_stages, tmp_path,
                                                                   monkeypatch):
    # A non-empty ./planned in the working directory is nobody's business.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "planned").mkdir()
    (tmp_path / "planned" / "notes.txt").write_text("mine")
    with pytest.raises(StageStarted):
        no_stages.run(tiny_recipe(), str(tmp_path / "run"))
    # A stage's own output directory holding something else is refused before any stage.
    workdir = tmp_path / "taken"
    (workdir / "prune70" / "hf").mkdir(parents=True)
    (workdir / "prune70" / "hf" / "notes.txt").write_text("mine")
    with pytest.raises(OSError, match=re.escape(str(workdir / "prune70" / "hf"))):
        no_stages.run(tiny_recipe(), str(workdir))


def test_a_prune_stage_counts_its_start_without_loading_the_model(finetune_dirs, tmp_path,
                                                                  monkeypatch):
    from sparse_llama.commands import recipe

    _, sparse_dir, _, _ = finetune_dirs  # 70% sparse
    monkeypatch.setattr(recipe.loading, "load_model", None)  # nothing is loaded whole
    config = tiny_recipe()
    for start in (sparse_dir, without(sparse_dir, tmp_path, "masks", "sparsity_report.json")):
        stage_dir = tmp_path / "prune50"
        stage_dir.mkdir(exist_ok=True)
        with pytest.raises(ValueError, match=r"already 0\.700 sparse, more than the 0\.5 asked"):
            recipe._prune_stage(config, "prune50", start, str(stage_dir), None)
