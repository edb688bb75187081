"""configs/finetune_distill.py end to end through `commands.train`, and its up-front refusals."""

import json
import os

import jax
import numpy as np
import pytest

from configs import finetune_distill
from sparse_llama.commands import train as train_command
from sparse_llama.data.tokenizer import train_bpe
from sparse_llama.ground.tree_paths import path_name
from sparse_llama.model import hf_io
from sparse_llama.model.config import preset
from sparse_llama.sparse_io import mask_io

CFG = preset("tiny")


@pytest.fixture
def dirs(finetune_dirs):
    return finetune_dirs


def assert_exported_with_the_student_mask(summary: dict, student_dir: str) -> None:
    """Every position the student's masks/ prunes is exactly 0.0 in the exported weights, the
    export's masks/ are the student's, its "sparsity" is their pruned fraction exactly, and
    every target tensor trained where it is kept."""
    _, student = hf_io.load_hf(student_dir)
    masks = mask_io.load_masks(os.path.join(student_dir, "masks"), student)
    _, out = hf_io.load_hf(summary["hf_dir"])
    kept = total = 0
    for (path, m), w, w0 in zip(jax.tree_util.tree_flatten_with_path(masks)[0],
                                jax.tree.leaves(out), jax.tree.leaves(student), strict=True):
        if np.ndim(m) == 0:
            continue
        w, w0 = np.asarray(w), np.asarray(w0)
        assert np.count_nonzero(w[~m]) == 0, path_name(path)  # not one pruned weight revived
        assert np.any(w[m] != w0[m]), path_name(path)
        kept, total = kept + int(m.sum()), total + m.size
    saved = mask_io.load_masks(os.path.join(summary["hf_dir"], "masks"), out)
    jax.tree.map(np.testing.assert_array_equal, saved, masks)
    assert summary["sparsity"] == pytest.approx(1 - kept / total, abs=1e-12)


def _config(dirs, data_path, **distill):
    teacher, student, _, _ = dirs
    config = finetune_distill.get_config("tiny")
    config.model.hf_path = student
    config.distill.teacher_path = teacher
    config.distill.update(distill)
    config.data.update(path=data_path, seq_len=32, validation_fraction=0.1)
    config.train.update(steps=3, batch_size=8, eval_batches=1, eval_every=0, log_every=1,
                        checkpoint_every=0)
    config.optimizer.warmup_steps = 1
    return config


def test_distillation_on_chat_data_keeps_the_mask_and_reports_each_term(dirs, tmp_path):
    summary = train_command.train(_config(dirs, dirs[2]), str(tmp_path / "run"))  # instruction JSONL
    assert summary["step"] == 3 and summary["eval_perplexity"] > 1
    assert_exported_with_the_student_mask(summary, dirs[1])
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    train = [r for r in records if "kd" in r]
    assert train and {"ce", "kd", "squarehead", "loss"} <= set(train[-1])


def test_a_teacher_no_term_reads_is_not_loaded(dirs, monkeypatch):
    # Catches: the teacher loaded (and its forward run every step) for a CE-only distillation.
    from sparse_llama.distill import objective as distill
    from sparse_llama.model import sharding

    config = _config(dirs, dirs[3], kd_weight=0.0, layer_weight=0.0)
    mesh, rules = sharding.make_mesh(config.mesh), sharding.rules_from_config(config.mesh)
    monkeypatch.setattr(hf_io, "load_hf", lambda *a, **k: pytest.fail("loaded the teacher"))
    assert distill.build(config, CFG, mesh, rules).inputs is None


def test_teacher_dtype_and_depth_come_from_the_config(dirs):
    from sparse_llama.distill.objective import teacher_config

    config = _config(dirs, dirs[3], teacher_dtype="bfloat16")
    assert teacher_config(config, CFG).dtype == "bfloat16"
    with pytest.raises(ValueError, match="vocabulary of 512 ids but the student has 600"):
        teacher_config(config, CFG.replace(vocab_size=600))


def test_a_teacher_with_another_tokenizer_is_refused_before_loading(dirs, tmp_path):
    teacher, student, _, text = dirs
    other = tmp_path / "other_teacher"
    other.mkdir()
    for name in ("config.json", "model.safetensors"):
        (other / name).symlink_to(f"{teacher}/{name}")
    tok = train_bpe(["some other text entirely"] * 10, 300)
    tok.save(other)
    with pytest.raises(ValueError, match="the teacher's tokenizer .* differs from the student"):
        train_command.train(_config(dirs, text, teacher_path=str(other)), str(tmp_path / "run"))
