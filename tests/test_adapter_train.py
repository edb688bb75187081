"""LoRA (configs/finetune.py with finetune.lora_rank) and soft prompts (configs/soft_prompt.py)
end to end through `commands.train`: what trains, what is exported, resume, refusals."""

import json
import os

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file
from test_distill_train import assert_exported_with_the_student_mask

from configs import finetune, soft_prompt
from sparse_llama.commands import export as export_command
from sparse_llama.commands import train as train_command
from sparse_llama.ground.tree_paths import path_name
from sparse_llama.model import hf_io, lora
from sparse_llama.model import soft_prompt as prompts
from sparse_llama.sparsity.masks import is_target
from sparse_llama.train import run_setup


def _small(config, data_path, steps=3):
    config.data.update(path=data_path, seq_len=32, validation_fraction=0.1)
    config.train.update(steps=steps, batch_size=8, eval_batches=1, eval_every=0, log_every=1,
                        checkpoint_every=0)
    config.optimizer.warmup_steps = 1
    return config


def _lora_config(dirs, rank=4, objective="finetune"):
    config = finetune.get_config("tiny")
    if objective == "distill":
        from configs import finetune_distill

        config = finetune_distill.get_config("tiny")
        config.distill.teacher_path = dirs[0]
    config.model.hf_path = dirs[1]
    config.finetune.lora_rank = rank
    config.optimizer.lr = 1e-2
    return _small(config, dirs[2])


def _flat(params):
    return {path_name(p): np.asarray(w) for p, w in jax.tree_util.tree_flatten_with_path(params)[0]}


def test_lora_trains_adapters_and_exports_the_merge_with_the_base_zeros(finetune_dirs, tmp_path):
    summary = train_command.train(_lora_config(finetune_dirs), str(tmp_path / "run"))
    assert summary["step"] == 3 and np.isfinite(summary["eval_perplexity"])
    assert_exported_with_the_student_mask(summary, finetune_dirs[1])
    _, base = hf_io.load_hf(finetune_dirs[1])
    _, merged = hf_io.load_hf(summary["hf_dir"])
    adapters, rank, alpha = lora.load_adapters(summary["adapters"])
    assert (rank, alpha) == (4, 4.0)
    base_f, merged_f = _flat(base), _flat(merged)
    changed = 0
    for name, w in base_f.items():
        if not is_target(name):
            np.testing.assert_array_equal(merged_f[name], w)  # the model itself is frozen
            continue
        # Where the base is pruned, the merge is exactly zero; elsewhere it moved.
        assert not np.any(merged_f[name][w == 0])
        changed += int(np.any(merged_f[name] != w))
    assert changed == 7  # every target linear's adapter trained (b left zero)
    # The merged export is the saved adapters applied to the base (scale alpha / rank = 1).
    masks = jax.tree.map(lambda w: w != 0, base)
    expect = _flat(lora.merge(base, adapters, masks, 1.0))
    for name, w in merged_f.items():
        np.testing.assert_allclose(w, expect[name], rtol=1e-6, atol=1e-7)
    # The checkpoint holds only the adapters: a longer rerun resumes from them.
    config = _lora_config(finetune_dirs)
    config.train.steps = 4
    assert train_command.train(config, str(tmp_path / "run"))["step"] == 4
    with pytest.raises(ValueError, match="trained LoRA adapters of a frozen model"):
        export_command.export_workdir(str(tmp_path / "run"))


def test_lora_wraps_distillation(finetune_dirs, tmp_path):
    summary = train_command.train(_lora_config(finetune_dirs, objective="distill"), str(tmp_path / "r"))
    assert summary["step"] == 3
    assert_exported_with_the_student_mask(summary, finetune_dirs[1])
    assert summary["adapters"].endswith("adapters.safetensors")


def test_lora_keeps_the_base_mask_with_keep_false_and_trains_a_dense_base(finetune_dirs,
                                                                          tmp_path):
    # Catches: the merge keeping the base's mask only with sparsity.keep=True (W + scale * a @ b
    # everywhere otherwise: the "mask-preserving" adapters densify the pruned model).
    config = _lora_config(finetune_dirs, objective="distill")
    config.sparsity.keep = False
    config.train.steps = 2
    summary = train_command.train(config, str(tmp_path / "sparse"))
    assert_exported_with_the_student_mask(summary, finetune_dirs[1])
    # A dense base trains with keep=False (keep=True refuses it, test below) and exports a
    # dense checkpoint: no all-True masks/ beside it.
    config = _lora_config(finetune_dirs)
    config.model.hf_path = finetune_dirs[0]
    config.sparsity.keep = False
    config.train.steps = 2
    summary = train_command.train(config, str(tmp_path / "dense"))
    assert "sparsity" not in summary and not os.path.isdir(os.path.join(summary["hf_dir"],
                                                                        "masks"))
    _, base = hf_io.load_hf(finetune_dirs[0])
    _, merged = hf_io.load_hf(summary["hf_dir"])
    assert all(np.any(merged_w != w) for name, w in _flat(base).items() if is_target(name)
               for merged_w in [_flat(merged)[name]])


def test_lora_refuses_a_dense_base_with_keep_and_a_static_mask(finetune_dirs, tmp_path):
    # Catches: keep=True on a dense base training "sparse" with all-True masks, and
    # sparsity.init silently ignored by LoRA (the frozen base is never masked).
    config = _lora_config(finetune_dirs)
    config.model.hf_path = finetune_dirs[0]
    with pytest.raises(ValueError, match=r"only 0\.0% of its target weights are pruned"):
        train_command.train(config, str(tmp_path / "dense"))
    assert not (tmp_path / "dense" / "checkpoints").exists()
    config = _lora_config(finetune_dirs)
    config.model.hf_path = finetune_dirs[0]  # (a sparse base refuses init first, sparse_start)
    config.sparsity.update(init="magnitude", sparsity=0.5)
    with pytest.raises(ValueError, match=r"sparsity.init='magnitude' with finetune.lora_rank"):
        train_command.train(config, str(tmp_path / "init"))
    assert not (tmp_path / "init" / "checkpoints").exists()


@pytest.mark.parametrize("change, message", [
    ({"finetune.lora_rank": 1000}, "lora_rank=1000 is larger than"),
    ({"finetune.lora_rank": -2}, "lora_rank must be a positive integer"),
    ({"finetune.lora_alpha": -1.0}, "lora_alpha must be a number >= 0"),
    ({"train.objective": "sat"}, "LoRA wraps only"),
])
def test_bad_lora_settings_fail_before_any_step(finetune_dirs, tmp_path, change, message):
    config = _lora_config(finetune_dirs)
    for key, value in change.items():
        section, name = key.split(".")
        config[section][name] = value
    with pytest.raises(ValueError, match=message):
        train_command.train(config, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def _prompt_config(dirs, **section):
    config = soft_prompt.get_config("tiny")
    config.model.hf_path = dirs[1]  # the sparse student: the prompt adapts a frozen model
    config.soft_prompt.update({"num_tokens": 6, **section})
    config.optimizer.lr = 5e-2
    return _small(config, dirs[3])


def test_soft_prompt_training_writes_a_prompt_that_lowers_the_loss(finetune_dirs, tmp_path):
    config = _prompt_config(finetune_dirs, init_text="def f(x):")
    config.train.steps = 6
    summary = train_command.train(config, str(tmp_path / "run"))
    assert "hf_dir" not in summary  # the model is not changed, so not written again
    saved = load_file(summary["soft_prompt"])[prompts.TENSOR]
    assert saved.shape == (6, 64)
    _, base = hf_io.load_hf(finetune_dirs[1])
    tokenizer = run_setup.resolve_tokenizer(config)[0]
    init = np.asarray(prompts.init_from_text(base, tokenizer.encode("def f(x):"), 6))
    assert np.abs(saved - init).max() > 1e-3  # it trained from the init text's embeddings
    records = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").open())
               if "grad_norm" in r]
    assert records[-1]["loss"] < records[0]["loss"]


def test_soft_prompt_settings_are_checked(finetune_dirs, tmp_path):
    with pytest.raises(ValueError, match="num_tokens must be a positive integer"):
        train_command.train(_prompt_config(finetune_dirs, num_tokens=0), str(tmp_path / "a"))
    config = _prompt_config(finetune_dirs)
    config.model.hf_path = ""
    with pytest.raises(ValueError, match="a soft prompt adapts a trained model"):
        train_command.train(config, str(tmp_path / "b"))
