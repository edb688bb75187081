"""`launch.eval` on bad inputs and on document files, as a user runs it (subprocess).

Numbers are checked against transformers on the same token windows; bad inputs must end in one
`error:` line, exit status 2 and no summary line on stdout.
"""

import json
import math

import hf_fixtures
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file
from test_cli import last_json, run_cli


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-1000:], proc.stderr[-2000:])
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert lines[-1].startswith("error: "), proc.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]
    assert "Traceback" not in proc.stderr
    assert "{" not in proc.stdout  # no summary line, in particular no {"perplexity": NaN}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_cli")
    model = hf_fixtures.build_hf_model(max_position_embeddings=256)
    return model, hf_fixtures.save_hf_checkpoint(model, root / "ckpt"), root


def eval_cli(ckpt, path, *extra):
    return run_cli("launch.eval", "--config=configs/eval.py", f"--config.model.hf_path={ckpt}",
                   f"--config.data.eval_path={path}", "--config.data.seq_len=16", *extra)


def test_a_tokenizer_with_ids_beyond_the_vocabulary_is_refused(tmp_path):
    # 96 embedding rows, the fixture tokenizer has 101 ids: jnp.take would give NaN rows.
    model = hf_fixtures.build_hf_model(vocab_size=96, max_position_embeddings=256)
    ckpt = hf_fixtures.save_hf_checkpoint(model, tmp_path / "ckpt")
    text = tmp_path / "text.txt"
    text.write_text(" ".join(hf_fixtures.SENTENCES * 10))
    assert_one_line_error(eval_cli(ckpt, text), "the tokenizer has 101 ids",
                          "has only 96 rows")


def test_a_non_finite_perplexity_is_an_error_with_its_cause(checkpoint, tmp_path):
    model, ckpt, root = checkpoint
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in ckpt.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    weights = load_file(str(broken / "model.safetensors"))
    weights["model.norm.weight"][3] = np.inf  # inf * 0 in the head: NaN logits
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    text = root / "nan.txt"
    text.write_text(" ".join(hf_fixtures.SENTENCES * 10))
    assert_one_line_error(eval_cli(broken, text), "mean NLL", "nan", "not finite")


def framed_stream(tok, texts):
    """Each document as training frames it, [BOS] ids [EOS], concatenated (transformers' ids)."""
    stream = []
    for text in texts:
        stream += [tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"],
                   tok.eos_token_id]
    return stream


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_document_files_are_read_as_training_reads_them(checkpoint, tmp_path, kind):
    model, ckpt, _ = checkpoint
    docs = hf_fixtures.SENTENCES * 6
    if kind == "jsonl":
        path = tmp_path / "docs.jsonl"
        # An extra key and the field name: raw-text scoring would include both.
        path.write_text("".join(json.dumps({"id": i, "body": d}) + "\n"
                                for i, d in enumerate(docs)))
    else:
        path = tmp_path / "docs.parquet"
        pq.write_table(pa.table({"body": docs, "id": list(range(len(docs)))}), path)
    out = last_json(eval_cli(ckpt, path, "--config.data.text_field=body"))
    tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    ids = framed_stream(tok, docs)
    n = len(ids) // 16
    windows = torch.tensor(ids[: n * 16]).reshape(n, 16)
    with torch.no_grad():
        loss = float(model(windows, labels=windows).loss)
    assert out["windows"] == n and out["tokens"] == n * 15
    assert out["perplexity"] == pytest.approx(math.exp(loss), rel=1e-4)


def test_a_text_file_is_one_stream_and_a_folder_is_documents(tmp_path):
    from sparse_llama.commands.eval import eval_tokens
    from sparse_llama.data.tokenizer import load_tokenizer

    tok = load_tokenizer(hf_fixtures.save_tokenizer(tmp_path / "tok"))
    a, b = hf_fixtures.SENTENCES[:2]
    (tmp_path / "one.txt").write_text(f"{a}\n\n{b}")
    # Wikitext-style: tokenized once as it is, blank line included, nothing inserted.
    assert eval_tokens(str(tmp_path / "one.txt"), tok).tolist() == tok.encode(f"{a}\n\n{b}")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.txt").write_text(b)
    (tmp_path / "docs" / "a.txt").write_text(a)
    assert eval_tokens(str(tmp_path / "docs"), tok).tolist() == [
        tok.bos_id, *tok.encode(a), tok.eos_id, tok.bos_id, *tok.encode(b), tok.eos_id]
