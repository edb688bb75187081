"""configs/finetune_distill.py end to end through `commands.train`, and its up-front refusals."""

import json

import pytest

from configs import finetune_distill
from sparse_llama.commands import train as train_command
from sparse_llama.data.tokenizer import train_bpe
from sparse_llama.model.config import preset

CFG = preset("tiny")


@pytest.fixture
def dirs(finetune_dirs):
    return finetune_dirs


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
    assert abs(summary["sparsity"] - 0.7) < 0.01
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    train = [r for r in records if "kd" in r]
    assert train and {"ce", "kd", "squarehead", "loss"} <= set(train[-1])


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
