"""The commands end to end, as a user runs them: eval, generate, prune; one-line errors.

The checkpoint is made with transformers' own `save_pretrained` (not by our writer), and every
number is checked against transformers on the same input.
"""

import errno
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import hf_fixtures
import numpy as np
import pytest
import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "HF_HUB_OFFLINE": "1"}


def run_cli(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env or ENV,
                          capture_output=True, text=True, timeout=600)


def last_json(proc) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = hf_fixtures.build_hf_model(max_position_embeddings=256)
    ckpt = hf_fixtures.save_hf_checkpoint(model, root / "ckpt")
    text = root / "text.txt"
    text.write_text(" ".join(hf_fixtures.SENTENCES * 30))
    return model, ckpt, text


def hf_perplexity(model, ckpt, text, seq_len):
    tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    ids = tok(text.read_text(), add_special_tokens=False)["input_ids"]
    n = len(ids) // seq_len
    windows = torch.tensor(ids[: n * seq_len]).reshape(n, seq_len)
    with torch.no_grad():
        loss = model(windows, labels=windows).loss  # mean over the n * (seq_len - 1) targets
    return math.exp(float(loss)), n * (seq_len - 1)


def test_eval_matches_transformers_perplexity(checkpoint):
    model, ckpt, text = checkpoint
    out = last_json(run_cli("launch.eval", "--config=configs/eval.py",
                            f"--config.model.hf_path={ckpt}", f"--config.data.eval_path={text}",
                            "--config.data.seq_len=32", "--config.eval.batch_size=3"))
    expected, tokens = hf_perplexity(model, ckpt, text, 32)
    assert out["tokens"] == tokens
    assert out["perplexity"] == pytest.approx(expected, rel=1e-4)  # far inside 0.5%


def hf_greedy(model, prompt, new, **kwargs):
    with torch.no_grad():
        return model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                              do_sample=False, max_new_tokens=new, **kwargs
                              )[0, len(prompt):].tolist()


def test_generate_matches_transformers_greedy(checkpoint):
    model, ckpt, _ = checkpoint
    out = last_json(run_cli("launch.generate", "--config=configs/generate.py",
                            f"--config.model.hf_path={ckpt}", "--config.prompt=a llama walks",
                            "--config.max_new_tokens=12"))
    tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    # Encoded as transformers encodes it: this tokenizer's post-processor adds no BOS.
    prompt = tok("a llama walks")["input_ids"]
    assert prompt[0] != tok.bos_token_id
    ref = hf_greedy(model, prompt, 12)
    assert out["prompt_tokens"] == len(prompt)
    assert out["tokens"] == ref
    assert out["text"] == tok.decode(ref)


def test_generate_stops_at_every_eos_of_the_generation_config(checkpoint, tmp_path):
    model, ckpt, _ = checkpoint
    tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    prompt = tok("the quick brown")["input_ids"]
    full = hf_greedy(model, prompt, 16, eos_token_id=None)
    turn_end = next(t for t in full[3:] if t != tok.eos_token_id)  # emitted after 3 tokens
    stop = full.index(turn_end) + 1
    assert stop < 16
    chat = tmp_path / "chat"
    chat.mkdir()
    for f in ckpt.iterdir():
        (chat / f.name).write_bytes(f.read_bytes())
    gen = json.loads((chat / "generation_config.json").read_text())
    (chat / "generation_config.json").write_text(json.dumps(
        {**gen, "eos_token_id": [tok.eos_token_id, turn_end]}))  # Llama-3-Instruct's shape
    out = last_json(run_cli("launch.generate", "--config=configs/generate.py",
                            f"--config.model.hf_path={chat}", "--config.prompt=the quick brown",
                            "--config.max_new_tokens=16"))
    assert out["tokens"] == full[:stop]
    assert out["tokens"] == hf_greedy(hf_fixtures.load_hf_model(chat), prompt, 16)


def test_prune_writes_a_checkpoint_transformers_loads(checkpoint, tmp_path):
    model, ckpt, text = checkpoint
    out_dir = tmp_path / "pruned"
    out = last_json(run_cli(
        "launch.prune", "--config=configs/prune.py:sparsegpt24", f"--config.model.hf_path={ckpt}",
        f"--config.output_dir={out_dir}", f"--config.calibration.path={text}",
        "--config.calibration.num_samples=8", "--config.calibration.seq_len=32",
        f"--config.eval.path={text}", "--config.eval.seq_len=32"))
    assert out["sparsity"] == pytest.approx(0.5)
    assert out["output_dir"] == str(out_dir)
    pruned = hf_fixtures.load_hf_model(out_dir)
    for name, w in pruned.named_parameters():
        if name.endswith("proj.weight"):
            groups = (w.detach().numpy().reshape(w.shape[0], -1, 4) == 0).sum(-1)
            assert (groups >= 2).all(), name  # 2:4 along the input dimension
        else:
            np.testing.assert_array_equal(w.detach().numpy(),
                                          model.state_dict()[name].numpy())
    report = json.loads((out_dir / "sparsity_report.json").read_text())
    assert report["overall"] == pytest.approx(0.5)
    expected, _ = hf_perplexity(pruned, out_dir, text, 32)
    assert out["perplexity_after"] == pytest.approx(expected, rel=1e-4)
    before, _ = hf_perplexity(model, ckpt, text, 32)
    assert out["perplexity_before"] == pytest.approx(before, rel=1e-4)
    from sparse_llama.sparse_io import mask_io

    masks = mask_io.load_masks(out_dir / "masks")
    q = np.asarray(masks["layers"]["self_attn"]["q_proj"][0]).T  # stored (in, out)
    np.testing.assert_array_equal(
        q, pruned.model.layers[0].self_attn.q_proj.weight.detach().numpy() != 0)


@pytest.mark.parametrize("args, message", [
    (["launch.prune", "--config=configs/prune.py", "--config.pruning.sparsity=1.5"],
     "pruning.sparsity=1.5 is outside [0, 1)"),
    (["launch.prune", "--config=configs/prune.py", "--config.pruning.n=4",
      "--config.pruning.m=2"], "0 < N < M"),
    (["launch.prune", "--config=configs/prune.py", "--config.calibration.path=/nonexistent.txt"],
     "calibration.path"),
    (["launch.prune", "--config=configs/prune.py", "--config.calibration.seq_len=4096"],
     "calibration.seq_len=4096 exceeds the model's context of 256 tokens"),
    (["launch.prune", "--config=configs/prune.py", "--config.pruning.profile=list",
      "--config.pruning.layer_sparsities=(0.5,)"], "one sparsity per decoder block"),
    (["launch.prune", "--config=configs/prune.py", "--config.pruning.owl_lambda=2.0"],
     "pruning.owl_lambda=2.0"),
    (["launch.eval", "--config=configs/eval.py", "--config.data.eval_path=/nonexistent.txt"],
     "data.eval_path"),
    (["launch.eval", "--config=configs/eval.py"], "model.hf_path is empty"),
    (["launch.generate", "--config=configs/generate.py", "--config.top_p=0"], "top_p"),
])
def test_user_errors_are_one_line(checkpoint, tmp_path, args, message):
    _, ckpt, text = checkpoint
    extra = [f"--config.model.hf_path={ckpt}"] if "hf_path is empty" not in message else []
    if args[0] == "launch.prune":
        extra.append(f"--config.output_dir={tmp_path / 'out'}")
    if args[0] == "launch.eval" and "eval_path" not in message:
        extra = []
    proc = run_cli(*args, *extra)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert lines[-1].startswith("error: ") and message in lines[-1], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_pruning_into_the_source_checkpoint_is_refused(checkpoint):
    _, ckpt, _ = checkpoint
    proc = run_cli("launch.prune", "--config=configs/prune.py", f"--config.model.hf_path={ckpt}",
                   f"--config.output_dir={ckpt}/")
    assert proc.returncode == 2 and "replace the dense checkpoint" in proc.stderr
    assert (ckpt / "model.safetensors").exists()


def test_prune_on_eight_devices_with_a_partial_last_micro_batch(checkpoint, tmp_path):
    _, ckpt, text = checkpoint
    env = {**ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = run_cli("launch.prune", "--config=configs/prune.py", f"--config.model.hf_path={ckpt}",
                   f"--config.output_dir={tmp_path / 'o'}", f"--config.calibration.path={text}",
                   "--config.calibration.num_samples=12", "--config.calibration.seq_len=32",
                   env=env)
    assert last_json(proc)["sparsity"] == pytest.approx(0.5)


def test_non_llama_checkpoint_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    proc = run_cli("launch.eval", "--config=configs/eval.py", f"--config.model.hf_path={tmp_path}",
                   f"--config.data.eval_path={tmp_path / 'config.json'}")
    assert proc.returncode == 2
    assert "mistral" in proc.stderr and "Traceback" not in proc.stderr


def run_main(run_fn, capsys):
    """`launching.main(run_fn)` in this process: (exit status, stdout, stderr)."""
    from sparse_llama.commands import launching

    code = 0
    try:
        launching.main(run_fn)
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("summary, key", [
    ({"perplexity": float("nan"), "tokens": 3}, "'perplexity' is nan"),
    ({"loss": np.float32("inf")}, "'loss' is inf"),
    ({"eval": {"perplexity": -math.inf}}, "'eval.perplexity' is -inf"),
    ({"losses": [1.0, float("nan")]}, "'losses[1]' is nan"),
])
def test_a_non_finite_summary_value_is_an_error_naming_its_key(capsys, summary, key):
    code, out, err = run_main(lambda: summary, capsys)
    assert code == 2
    assert out == ""  # nothing on stdout: no bare NaN for a JSON reader to choke on
    assert err.startswith("error: ") and key in err and err.count("\n") == 1


def test_the_summary_is_strict_json_with_none_as_null(capsys):
    code, out, _ = run_main(lambda: {"loss": None, "step": np.int64(3),
                                     "ppl": np.float32(2.5)}, capsys)
    assert code == 0
    assert json.loads(out.strip().splitlines()[-1]) == {"loss": None, "step": 3, "ppl": 2.5}
    assert '"step": 3,' in out  # an integer stays an integer


def _raise(err):
    def run():
        raise err
    return run


def test_os_errors_are_one_line_naming_the_path(capsys, tmp_path):
    def read_a_directory():
        with open(tmp_path):
            pass

    code, out, err = run_main(read_a_directory, capsys)
    assert code == 2 and out == ""
    assert err == f"error: Is a directory: {tmp_path}\n"
    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "model.safetensors"))
    code, _, err = run_main(_raise(full), capsys)
    assert (code, err) == (2, f"error: No space left on device: {tmp_path}/model.safetensors\n")
    moved = PermissionError(errno.EACCES, "Permission denied", "/a", None, "/b")  # a rename
    assert run_main(_raise(moved), capsys)[2] == "error: Permission denied: /a -> /b\n"


def test_a_permission_error_on_an_output_path_is_one_line(checkpoint, tmp_path):
    try:
        os.mkdir("/sys/kernel/sparse_llama_probe")
    except PermissionError:
        pass
    else:  # pragma: no cover - a system where even sysfs is writable
        os.rmdir("/sys/kernel/sparse_llama_probe")
        pytest.skip("/sys/kernel is writable here")
    _, ckpt, text = checkpoint
    proc = run_cli("launch.prune", "--config=configs/prune.py", f"--config.model.hf_path={ckpt}",
                   "--config.output_dir=/sys/kernel/pruned", f"--config.calibration.path={text}",
                   "--config.calibration.num_samples=2", "--config.calibration.seq_len=16",
                   "--config.pruning.method=magnitude")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert lines[-1].startswith("error: ") and "/sys/kernel/" in lines[-1], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "{" not in proc.stdout
