"""`python -m launch.train` as a user runs it: SIGTERM and resume, continuing a Hugging Face
model on a text file, two processes against one, and the tiny config's learning curve."""

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from configs import dense

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--config.data.seq_len=32",
         "--config.train.batch_size=8", "--config.train.eval_batches=1",
         "--config.optimizer.warmup_steps=2", "--config.train.log_every=1"]


def launch_env(devices: int = 8) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env.pop("OPENBLAS_CORETYPE", None)
    return env


def train_cmd(workdir, *flags, config="configs/dense.py:tiny") -> list[str]:
    return [sys.executable, "-m", "launch.train", f"--config={config}",
            f"--workdir={workdir}", *SMALL, *flags]


def run_train(workdir, *flags, devices=8, timeout=600, config="configs/dense.py:tiny") -> dict:
    proc = subprocess.run(train_cmd(workdir, *flags, config=config), cwd=REPO,
                          env=launch_env(devices),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def train_records(workdir) -> list[dict]:
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == "train"]


def run_until_sigterm(workdir, min_new_steps: int) -> tuple[dict, list[dict]]:
    """Start a long run, SIGTERM it once it made `min_new_steps` steps; (summary, new records)."""
    before = len(train_records(workdir))
    proc = subprocess.Popen(train_cmd(workdir, "--config.train.steps=5000",
                                      "--config.train.checkpoint_every=0"),
                            cwd=REPO, env=launch_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while len(train_records(workdir)) - before < min_new_steps:
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1]), train_records(workdir)[before:]


def test_sigterm_checkpoints_the_current_step_and_a_rerun_resumes_from_it(tmp_path):
    first, records = run_until_sigterm(tmp_path, 2)
    stopped_at = first["step"]
    assert first["stopped"] and 2 <= stopped_at < 5000
    assert records[-1]["step"] == stopped_at
    assert (tmp_path / "checkpoints" / str(stopped_at)).is_dir()
    second, records = run_until_sigterm(tmp_path, 1)
    assert records[0]["step"] == stopped_at + 1  # continued, not restarted
    assert second["stopped"] and second["step"] > stopped_at
    assert set(first) >= {"step", "loss", "eval_perplexity", "tokens_per_s", "workdir"}
    # An unfinished run exports its newest checkpoint on demand.
    proc = subprocess.run([sys.executable, "-m", "launch.export", f"--workdir={tmp_path}"],
                          cwd=REPO, env=launch_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    exported = json.loads(proc.stdout.strip().splitlines()[-1])
    assert exported == {"hf_dir": str(tmp_path / "hf"), "step": second["step"]}
    assert (tmp_path / "hf" / "config.json").is_file()
    assert (tmp_path / "hf" / "tokenizer.json").is_file()


def write_corpus(path: Path, documents: int, seed: int) -> Path:
    """Blank-line separated documents made of the tiny tokenizer's words."""
    from tests import hf_fixtures

    rng = random.Random(seed)
    docs = [" ".join(rng.choice(hf_fixtures.SENTENCES) for _ in range(rng.randint(1, 4)))
            for _ in range(documents)]
    path.write_text("\n\n".join(docs) + "\n")
    return path


def hf_perplexity(model, batches) -> float:
    """Perplexity of a transformers model on packed rows: each document piece on its own
    (its positions restart at 0 and it attends only to itself, as in our packed attention)."""
    import torch

    nll, count = 0.0, 0.0
    with torch.no_grad():
        for batch in batches:
            for r in range(batch["inputs"].shape[0]):
                for seg in set(batch["segment_ids"][r].tolist()) - {0}:
                    idx = batch["segment_ids"][r] == seg
                    assert (batch["positions"][r][idx] == np.arange(idx.sum())).all()
                    ids = torch.as_tensor(batch["inputs"][r][idx][None].astype(np.int64))
                    logp = torch.log_softmax(model(ids).logits[0].double(), -1).numpy()
                    targets = batch["targets"][r][idx]
                    weights = batch["loss_mask"][r][idx]
                    nll -= float((logp[np.arange(len(targets)), targets] * weights).sum())
                    count += float(weights.sum())
    return math.exp(nll / count)


def test_continue_training_a_hugging_face_checkpoint_on_a_text_file(tmp_path):
    from sparse_llama.data import pipeline
    from sparse_llama.data.tokenizer import load_tokenizer
    from tests import hf_fixtures

    original = hf_fixtures.build_hf_model(seed=3)
    hf_dir = hf_fixtures.save_hf_checkpoint(original, tmp_path / "pretrained")
    train_file = write_corpus(tmp_path / "train.txt", 300, seed=0)
    eval_file = write_corpus(tmp_path / "eval.txt", 40, seed=1)
    flags = [f"--config.model.hf_path={hf_dir}", f"--config.data.path={train_file}",
             f"--config.data.eval_path={eval_file}", "--config.train.steps=8",
             "--config.train.eval_batches=2", "--config.optimizer.lr=1e-2"]
    summary = run_train(tmp_path / "run", *flags)
    assert summary["step"] == 8
    exported = tmp_path / "run" / "hf"
    # The same evaluation windows, computed by transformers from the exported directory.
    config = dense.get_config("tiny")
    config.data.update(seq_len=32, path=str(train_file), eval_path=str(eval_file))
    tokenizer = load_tokenizer(exported)
    batches = pipeline.eval_batches(config.data, tokenizer, seq_len=32, batch_size=8,
                                    max_batches=2)
    trained = hf_fixtures.load_hf_model(exported)
    ours = summary["eval_perplexity"]
    assert hf_perplexity(trained, batches) == pytest.approx(ours, rel=1e-4)
    assert ours < 0.8 * hf_perplexity(original, batches)  # it did learn the file
    assert (exported / "tokenizer.json").is_file()


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    """Sparse training (a static 50% mask kept by the optimizer) with fsdp over all 8 devices:
    2 processes x 4 CPU devices against 1 process x 8, both reading 2 data shards, so params,
    moments and masks are split across the processes.

    Measured: losses agree to ~1e-7 relative and final params to ~1e-6 absolute; not bit for
    bit, because the gradient all-reduce sums in a different order across processes (gloo).
    """
    import portpicker

    sparse = "configs/sparse.py:tiny"
    flags = ["--config.train.steps=6", "--config.train.data_shards=2",
             "--config.train.checkpoint_every=3", "--config.sparsity.init=random",
             "--config.sparsity.sparsity=0.5", "--config.mesh.data=1", "--config.mesh.fsdp=8"]
    single = run_train(tmp_path / "one", *flags, config=sparse)
    port = portpicker.pick_unused_port()
    procs = [subprocess.Popen(
        train_cmd(tmp_path / "two", *flags, f"--coordinator_address=127.0.0.1:{port}",
                  "--num_processes=2", f"--process_id={i}", config=sparse),
        cwd=REPO, env=launch_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    double = json.loads(outs[0][0].strip().splitlines()[-1])
    assert double["step"] == single["step"] == 6
    losses_1 = [r["loss"] for r in train_records(tmp_path / "one")]
    losses_2 = [r["loss"] for r in train_records(tmp_path / "two")]
    np.testing.assert_allclose(losses_2, losses_1, rtol=1e-5)
    assert double["eval_perplexity"] == pytest.approx(single["eval_perplexity"], rel=1e-5)
    from sparse_llama.model import hf_io

    _, params_1 = hf_io.load_hf(tmp_path / "one" / "hf")
    _, params_2 = hf_io.load_hf(tmp_path / "two" / "hf")
    for a, b in zip(_leaves(params_1), _leaves(params_2), strict=True):
        np.testing.assert_allclose(b, a, atol=2e-5)
        np.testing.assert_array_equal(b == 0, a == 0)  # the same mask, kept exactly
    assert double["sparsity"] == single["sparsity"] == pytest.approx(0.5, abs=1e-3)
    from sparse_llama.sparse_io import mask_io

    # The masks/ of the 2-process export (each tensor gathered alone, process 0 writing).
    jax_masks = [mask_io.load_masks(tmp_path / d / "hf" / "masks", p)
                 for d, p in (("one", params_1), ("two", params_2))]
    for a, b in zip(_leaves(jax_masks[0]), _leaves(jax_masks[1]), strict=True):
        np.testing.assert_array_equal(b, a)
    data_files = os.listdir(tmp_path / "two" / "checkpoints" / "6" / "data")
    assert sorted(f for f in data_files if f.startswith("process_")) == [
        "process_0-of-2.json", "process_1-of-2.json"]


def _leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.mark.slow
def test_the_tiny_config_learns_the_embedded_corpus(tmp_path):
    """The documented command, as is: validation perplexity far below the unigram baseline."""
    proc = subprocess.run([sys.executable, "-m", "launch.train",
                           "--config=configs/dense.py:tiny", f"--workdir={tmp_path}"],
                          cwd=REPO, env=launch_env(), capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["eval_perplexity"] < 30, summary  # measured 20.6; unigram: 202


@pytest.mark.parametrize("args, names", [
    (["launch.train", "--config=configs/sparse70.py:bogus"],
     ["unknown variant 'bogus'", "['full', 'tiny']"]),
    (["launch.train", "--config.train.stepz=3"], ["config.train", "'stepz'", "'steps'"]),
    (["launch.plan", "--config=configs/sparse70.py:tiny", "--config.sparse50.trian.steps=1"],
     ["config.sparse50", "'trian'", "'train'"]),
    (["launch.prune", "--config.pruning.sparsty=0.5"], ["'sparsty'", "'sparsity'"]),
    (["launch.export", "--workdr=runs/x"], ["workdr", "workdir"]),
    (["launch.eval", "stray"], ["unexpected arguments ['stray']"]),
], ids=["variant", "key", "nested_key", "prune_key", "export_flag", "positional"])
def test_flag_mistakes_are_one_line_errors(args, names):
    """absl parses flags (and runs the config file) before the command starts: a mistake there
    is one `error:` line, exit status 2, as for any other input mistake."""
    proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=launch_env(1),
                          capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    for name in names:
        assert name in lines[0], lines[0]
    assert proc.stdout.strip() == ""
