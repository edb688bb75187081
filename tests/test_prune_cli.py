"""`launch.prune` on bad input, and the atomicity of its output directory.

Bad input stops the command with one `error: ...` line on stderr, exit status 2 and nothing
written to output_dir: a NaN/inf in a weight, an activation or a Hessian (named by block and
tensor), and a calibration text too short for its windows. The output directory appears whole
(model, masks/, sparsity_report.json) or not at all.
"""

import json
import math

import hf_fixtures
import pytest
import torch
from test_cli import ENV, last_json, run_cli

from configs import prune as prune_configs
from sparse_llama.commands import prune as prune_run
from sparse_llama.pruning import stream


def _checkpoint(path, poison=None):
    """A tiny HF checkpoint (transformers' own writer); `poison(model)` edits its weights."""
    model = hf_fixtures.build_hf_model(max_position_embeddings=256)
    if poison is not None:
        with torch.no_grad():
            poison(model)
    return hf_fixtures.save_hf_checkpoint(model, path)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(" ".join(hf_fixtures.SENTENCES * 30))  # ~1000 tokens
    return path


def _prune(ckpt, out, text, *extra, env=None):
    return run_cli("launch.prune", "--config=configs/prune.py", f"--config.model.hf_path={ckpt}",
                   f"--config.output_dir={out}", f"--config.calibration.path={text}",
                   "--config.calibration.num_samples=8", "--config.calibration.seq_len=32",
                   *extra, env=env or ENV)


def _one_line_error(proc, out, *fragments):
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert lines[-1].startswith("error: "), proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, lines[-1])
    assert "Traceback" not in proc.stderr
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}*"))  # no staging directory left behind


def _nan_weight(model):
    model.model.layers[1].self_attn.q_proj.weight[3, 5] = -float("nan")


def _inf_embedding(model):
    model.model.embed_tokens.weight[:, 7] = float("inf")


def _inf_norm(model):
    model.model.layers[0].post_attention_layernorm.weight[4] = float("inf")


@pytest.mark.parametrize("poison, fragments", [
    # Before: SparseGPT pruned around the NaN and wrote a model (exit 0).
    (_nan_weight, ["block 1", "model.layers.1.self_attn.q_proj.weight", "the weight has 1 "
                   "NaN/inf"]),
    # Every token's embedding is inf: block 0's inputs. Before: the Hessian was NaN, the
    # solver fell back to the identity with a warning and wrote a model.
    (_inf_embedding, ["block 0", "calibration inputs", "model.embed_tokens.weight"]),
    # The MLP's input goes inf after the norm: the first Hessian to hold it is gate/up's.
    (_inf_norm, ["model.layers.0.mlp.gate_proj.weight", "the Hessian of its inputs has"]),
], ids=["weight", "activation", "hessian"])
def test_nan_or_inf_stops_naming_block_and_tensor(tmp_path, text, poison, fragments):
    ckpt = _checkpoint(tmp_path / "ckpt", poison)
    out = tmp_path / "pruned"
    _one_line_error(_prune(ckpt, out, text), out, *fragments)


def test_short_calibration_text_is_refused_unless_overlap_is_allowed(tmp_path):
    ckpt = _checkpoint(tmp_path / "ckpt")
    short = tmp_path / "short.txt"
    short.write_text(" ".join(hf_fixtures.SENTENCES))  # tens of tokens, 8 x 32 = 256 asked
    out = tmp_path / "pruned"
    proc = _prune(ckpt, out, short)
    # Both counts and the fix are named. Before: a warning, 8 overlapping windows, a model.
    _one_line_error(proc, out, "too few calibration tokens", "8 x 32 = 256",
                    "calibration.allow_overlap=True")
    n_tokens = int(proc.stderr.split("the text has ")[1].split()[0])
    assert 32 <= n_tokens < 256
    summary = last_json(_prune(ckpt, out, short, "--config.calibration.allow_overlap=True"))
    assert summary["sparsity"] == pytest.approx(0.5) and (out / "masks").is_dir()


def test_a_foreign_non_empty_output_dir_is_refused_before_work(tmp_path, text):
    ckpt = _checkpoint(tmp_path / "ckpt")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("not a checkpoint")
    proc = _prune(ckpt, out, text)
    assert proc.returncode == 2 and "holds no config.json" in proc.stderr.splitlines()[-1]
    assert (out / "notes.txt").read_text() == "not a checkpoint"  # untouched


# In-process: the failure is injected between the model and its masks, where a kill left a
# complete-looking model without masks before the output was built aside.


def _config(ckpt, out, text):
    config = prune_configs.get_config("magnitude50")
    config.model.hf_path = str(ckpt)
    config.output_dir = str(out)
    config.calibration.path = str(text)
    config.calibration.num_samples = 8
    config.calibration.seq_len = 32
    return config


def test_output_appears_whole_or_not_at_all(tmp_path, text, monkeypatch):
    ckpt = _checkpoint(tmp_path / "ckpt")
    out = tmp_path / "pruned"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed between the model and its masks")

    with monkeypatch.context() as m:
        m.setattr(stream.mask_io.MaskWriter, "close", killed)
        with pytest.raises(KeyboardInterrupt):
            prune_run.run(_config(ckpt, out, text))
    assert not out.exists()  # before: out/ held config.json and the weights, no masks/
    assert not list(tmp_path.glob(".pruned*"))

    # A kill -9 leaves the staging directory; the next run clears it and commits a whole one,
    # replacing a previous output (which holds a config.json) in one rename.
    (tmp_path / ".pruned.partial").mkdir()
    (tmp_path / ".pruned.partial" / "config.json").write_text("{}")
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "stale.txt").write_text("from an older run")
    summary = prune_run.run(_config(ckpt, out, text))
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", "generation_config.json", "masks", "model.safetensors",
         "sparsity_report.json", "tokenizer.json", "tokenizer_config.json"])
    assert json.loads((out / "sparsity_report.json").read_text())["overall"] == pytest.approx(0.5)
    assert not list(tmp_path.glob(".pruned*"))
    assert summary["output_dir"] == str(out)
    assert summary["perplexity_before"] is None and summary["perplexity_after"] is None


def test_summary_has_no_nan(tmp_path, text, monkeypatch):
    ckpt = _checkpoint(tmp_path / "ckpt")
    config = _config(ckpt, tmp_path / "pruned", text)
    config.eval.path = str(text)
    config.eval.seq_len = 32

    # what a model whose loss overflowed evaluates to
    monkeypatch.setattr(stream, "_head_nll", lambda *a, **k: math.nan)
    summary = prune_run.run(config)
    # Before: NaN went into the summary, and json.dumps wrote the invalid token NaN.
    assert summary["perplexity_before"] is None and summary["perplexity_after"] is None
    json.dumps(summary, allow_nan=False)  # raises on NaN or inf
