"""Packing layout and invariants; the grain pipeline: mixture, determinism, process shards,
exact resume, evaluation batches, config errors."""

import json
import re

import grain
import numpy as np
import pytest

from configs import blocks
from sparse_llama.data import packing, pipeline
from sparse_llama.data import tokenizer as tok_lib

KEYS = {"inputs", "targets", "segment_ids", "positions", "loss_mask"}


@pytest.fixture(autouse=True, scope="module")
def _private_cache(tmp_path_factory):
    """Built artifacts (prose corpus, default tokenizer) go to this session's temp dir."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPARSE_LLAMA_CACHE", str(tmp_path_factory.getbasetemp() / "sl_cache"))
        yield


def _doc(i: int, rng) -> str:
    """A document whose id <i> can be read back from any row piece long enough."""
    words = " ".join(rng.choice(["alpha", "beta", "gamma", "delta"], size=rng.integers(3, 12)))
    return f"<{i}> {words} <{i}> {words} <{i}>"


@pytest.fixture(scope="module")
def tok():
    rng = np.random.default_rng(0)
    texts = [_doc(i, rng) for i in range(300)] + ["a a a aa zz z zzz"] * 5
    return tok_lib.train_bpe(texts, vocab_size=320)


@pytest.fixture
def docs_dir(tmp_path):
    """A folder of 40 one-document files (doc ids 0..39)."""
    rng = np.random.default_rng(1)
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(40):
        (folder / f"{i:03d}.txt").write_text(_doc(i, rng))
    return folder


def _cfg(seq_len=32, **overrides):
    cfg = blocks.data(seq_len)
    cfg.prefetch_batches = 0  # threads only where a test asks for them
    cfg.num_threads = 0
    cfg.shuffle_buffer = 0
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def _take(it, n):
    return [next(it) for _ in range(n)]


def _doc_ids(tok, batches) -> list[set[int]]:
    """Per batch, the document ids whose marker appears in a row."""
    out = []
    for b in batches:
        ids = set()
        for row, mask in zip(b["inputs"], b["loss_mask"], strict=True):
            text = tok.decode(row[mask > 0], skip_special_tokens=True)
            ids |= {int(m) for m in re.findall(r"<(\d+)>", text)}
        out.append(ids)
    return out


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert set(x) == set(y) == KEYS
        for k in KEYS:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ----------------------------------------------------------------------------- packing


def test_pack_exact_layout_with_bos():
    rows = packing.pack([[5, 6, 7], [8], [9, 10, 11, 12, 13]], 4, eos_id=2, bos_id=1)
    got = {k: np.stack([r[k] for r in rows]).tolist() for k in KEYS}
    # x = 1 5 6 7 2 | 1 8 2 | 1 9 10 11 12 13 2 ; inputs = x[:-1] and targets = x[1:] per doc
    assert got["inputs"] == [[1, 5, 6, 7], [1, 8, 1, 9], [10, 11, 12, 13]]
    assert got["targets"] == [[5, 6, 7, 2], [8, 2, 9, 10], [11, 12, 13, 2]]
    assert got["segment_ids"] == [[1, 1, 1, 1], [1, 1, 2, 2], [1, 1, 1, 1]]
    assert got["positions"] == [[0, 1, 2, 3], [0, 1, 0, 1], [0, 1, 2, 3]]
    assert got["loss_mask"] == [[1, 1, 1, 1]] * 3
    assert rows[0]["loss_mask"].dtype == np.float32
    assert all(rows[0][k].dtype == np.int32 for k in KEYS - {"loss_mask"})


def test_pack_exact_layout_without_bos_and_padding():
    rows = packing.pack([[5, 6, 7], [], [8]], 4, eos_id=2)
    got = {k: np.stack([r[k] for r in rows]).tolist() for k in KEYS}
    # The empty document contributes only an EOS target and no input: it is skipped.
    assert got["inputs"] == [[5, 6, 7, 8]]
    assert got["targets"] == [[6, 7, 2, 2]]
    assert got["segment_ids"] == [[1, 1, 1, 2]]
    assert got["positions"] == [[0, 1, 2, 0]]
    rows = packing.pack([[5, 6]], 4, eos_id=2, bos_id=1)
    assert rows[0]["inputs"].tolist() == [1, 5, 6, 0]
    assert rows[0]["targets"].tolist() == [5, 6, 2, 0]
    assert rows[0]["segment_ids"].tolist() == [1, 1, 1, 0]
    assert rows[0]["loss_mask"].tolist() == [1, 1, 1, 0]


@pytest.mark.parametrize("seq_len", [1, 7, 64])
def test_pack_invariants(seq_len):
    rng = np.random.default_rng(seq_len)
    docs = [rng.integers(4, 100, size=rng.integers(0, 40)).tolist() for _ in range(30)]
    rows = packing.pack(docs, seq_len, eos_id=2, bos_id=1)
    stream_in, stream_tgt = [], []
    for r in rows:
        seg, pos, mask = r["segment_ids"], r["positions"], r["loss_mask"]
        real = seg > 0
        np.testing.assert_array_equal(mask, real.astype(np.float32))
        assert np.all(np.diff(real.astype(int)) <= 0)  # padding only at the end
        assert np.all(r["inputs"][~real] == 0) and np.all(r["targets"][~real] == 0)
        segs = seg[real]
        assert segs[0] == 1 and np.all(np.diff(segs) >= 0) and np.all(np.diff(segs) <= 1)
        for s in np.unique(segs):
            np.testing.assert_array_equal(pos[seg == s], np.arange((seg == s).sum()))
            # Inside a piece, each target is the next input (no document boundary crossed).
            np.testing.assert_array_equal(r["targets"][seg == s][:-1], r["inputs"][seg == s][1:])
        stream_in += r["inputs"][real].tolist()
        stream_tgt += r["targets"][real].tolist()
    assert all(not np.any(r["segment_ids"] == 0) for r in rows[:-1])
    expected = [packing.document_example(d, eos_id=2, bos_id=1) for d in docs]
    assert stream_in == [t for e in expected for t in e["inputs"].tolist()]
    assert stream_tgt == [t for e in expected for t in e["targets"].tolist()]
    assert stream_tgt.count(2) == len(docs)  # every document ends by predicting EOS


def test_pack_state_resumes_mid_document():
    examples = [packing.document_example(list(range(10, 10 + n)), eos_id=2, bos_id=1)
                for n in (9, 3, 14, 1, 6)]
    ds = packing.PackIterDataset(grain.MapDataset.source(examples).to_iter_dataset(), 5)
    it = iter(ds)
    _take(it, 3)  # rows: doc0[:5], doc0[5:], doc1 + doc2[:1]
    state = json.loads(json.dumps(it.get_state()))
    assert state["offset"] == 1  # the 3rd document is being cut
    rest = list(it)
    fresh = iter(ds)
    fresh.set_state(state)
    _assert_same(rest, list(fresh))


# ----------------------------------------------------------------------------- pipeline


def test_batches_have_the_documented_format(tok, docs_dir):
    it = pipeline.train_iterator(_cfg(path=str(docs_dir)), tok, seq_len=32,
                                 global_batch_size=4, seed=0, process_index=0, process_count=1)
    for b in _take(it, 3):
        assert set(b) == KEYS
        for k in KEYS:
            assert b[k].shape == (4, 32)
            assert b[k].dtype == (np.float32 if k == "loss_mask" else np.int32)
        assert np.all(b["loss_mask"] == 1)  # an infinite stream has no padding
        assert b["inputs"].max() < tok.vocab_size


def test_mixture_proportions(tok, tmp_path):
    for name, letter in (("a", "a"), ("z", "z")):
        (tmp_path / name).mkdir()
        for i in range(5):
            (tmp_path / name / f"{i}.txt").write_text(f"{letter} {letter * 2} " * (3 + i))
    sources = {"a": {"kind": "text", "path": str(tmp_path / "a"), "weight": 3.0},
               "z": {"kind": "text", "path": str(tmp_path / "z"), "weight": 1.0}}
    cfg = _cfg(seq_len=8, sources=sources, validation_fraction=0.0, shuffle_buffer=16)
    it = pipeline.train_iterator(cfg, tok, seq_len=8, global_batch_size=8, seed=0,
                                 process_index=0, process_count=1)
    counts = {"a": 0, "z": 0}
    for b in _take(it, 50):
        for row in b["inputs"]:
            text = tok.decode(row, skip_special_tokens=True)
            assert text.strip(" az") == "" and not ("a" in text and "z" in text)
            counts["a" if "a" in text else "z"] += 1
    assert abs(counts["a"] / 400 - 0.75) < 0.03


def test_same_seed_same_batches_other_seed_other_batches(tok, docs_dir):
    def first(seed):
        cfg = _cfg(path=str(docs_dir), shuffle_buffer=8)
        return _take(pipeline.train_iterator(cfg, tok, seq_len=32, global_batch_size=4,
                                             seed=seed, process_index=0, process_count=1), 4)

    _assert_same(first(0), first(0))
    assert not all(np.array_equal(x["inputs"], y["inputs"])
                   for x, y in zip(first(0), first(1), strict=True))


def test_process_shards_are_disjoint_and_cover(tok, docs_dir):
    cfg = _cfg(path=str(docs_dir), validation_fraction=0.1)
    train_docs, _ = pipeline.source_splits(pipeline.mixture(cfg)[0], cfg)
    train_ids = {int(re.match(r"<(\d+)>", train_docs[i]).group(1)) for i in range(len(train_docs))}
    seen = []
    for p in range(2):
        it = pipeline.train_iterator(cfg, tok, seq_len=32, global_batch_size=4, seed=0,
                                     process_index=p, process_count=2)
        batches = _take(it, 60)  # several epochs of a ~18-document shard
        assert batches[0]["inputs"].shape == (2, 32)  # the local share of the global batch
        seen.append(set().union(*_doc_ids(tok, batches)))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == train_ids
    shards = [pipeline.shard(train_docs, p, 3).indices.tolist() for p in range(3)]
    assert sorted(sum(shards, [])) == list(range(len(train_docs)))


def test_resume_continues_with_exactly_the_next_batches(tok, docs_dir, tmp_path):
    (tmp_path / "b").mkdir()
    for i in range(12):
        (tmp_path / "b" / f"{i}.txt").write_text(f"<{100 + i}> gamma delta " * (2 + i))
    sources = {"docs": {"kind": "text", "path": str(docs_dir), "weight": 0.6},
               "more": {"kind": "text", "path": str(tmp_path / "b"), "weight": 0.4}}
    cfg = _cfg(seq_len=16, sources=sources, shuffle_buffer=8, prefetch_batches=2,
               num_threads=2)

    def make():
        return pipeline.train_iterator(cfg, tok, seq_len=16, global_batch_size=4, seed=3,
                                       process_index=0, process_count=1)

    it = make()
    _take(it, 7)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    expected = _take(it, 9)
    restored = make()
    restored.set_state(state)
    _assert_same(expected, _take(restored, 9))
    it.set_state(state)  # rewinding the same iterator works too
    _assert_same(expected, _take(it, 9))
    it.close()
    restored.close()


def test_path_shortcut_holds_out_documents(tok, tmp_path):
    rng = np.random.default_rng(2)
    book = tmp_path / "book.txt"
    book.write_text("\n\n".join(_doc(i, rng) for i in range(60)))
    cfg = _cfg(path=str(book), validation_fraction=0.1)
    it = pipeline.train_iterator(cfg, tok, seq_len=32, global_batch_size=4, seed=0,
                                 process_index=0, process_count=1)
    train_seen = set().union(*_doc_ids(tok, _take(it, 80)))
    evals = pipeline.eval_batches(cfg, tok, seq_len=32, batch_size=4)
    eval_seen = set().union(*_doc_ids(tok, evals))
    assert eval_seen and not train_seen & eval_seen
    assert train_seen | eval_seen == set(range(60))
    last = evals[-1]
    assert last["inputs"].shape == (4, 32) and last["loss_mask"][-1].sum() < 32  # padded
    _assert_same(evals, pipeline.eval_batches(cfg, tok, seq_len=32, batch_size=4))
    assert len(pipeline.eval_batches(cfg, tok, seq_len=8, batch_size=2, max_batches=3)) == 3


def test_eval_path_replaces_the_held_out_split(tok, docs_dir, tmp_path):
    held = tmp_path / "held.txt"
    held.write_text("<900> alpha beta\n\n<901> gamma delta")
    cfg = _cfg(path=str(docs_dir), eval_path=str(held))
    evals = pipeline.eval_batches(cfg, tok, seq_len=32, batch_size=2)
    assert set().union(*_doc_ids(tok, evals)) == {900, 901}
    it = pipeline.train_iterator(cfg, tok, seq_len=32, global_batch_size=4, seed=0,
                                 process_index=0, process_count=1)
    assert set().union(*_doc_ids(tok, _take(it, 40))) == set(range(40))  # nothing held out


def test_default_mixture():
    tok = tok_lib.default_tokenizer(512)
    cfg = _cfg(seq_len=64)
    assert [(s.name, s.kind, s.weight) for s in pipeline.mixture(cfg)] == [
        ("code", "default_code", pytest.approx(0.3)), ("text", "default_prose", 0.7)]
    it = pipeline.train_iterator(cfg, tok, seq_len=64, global_batch_size=4, seed=0,
                                 process_index=0, process_count=1)
    b = next(it)
    assert b["inputs"].shape == (4, 64) and np.all(b["loss_mask"] == 1)
    evals = pipeline.eval_batches(cfg, tok, seq_len=64, batch_size=4, max_batches=3)
    assert len(evals) == 3 and evals[0]["targets"].shape == (4, 64)


def test_config_errors(tok, docs_dir):
    def check(match, **overrides):
        with pytest.raises(ValueError, match=match):
            pipeline.train_iterator(_cfg(**overrides), tok, seq_len=32, global_batch_size=4,
                                    seed=0, process_index=0, process_count=2)

    check("kind must be one of", sources={"x": {"kind": "csv", "path": str(docs_dir)}})
    check("takes no path", sources={"x": {"kind": "default_code", "path": str(docs_dir)}})
    check("needs a path", sources={"x": {"kind": "jsonl"}})
    check("weight must be positive", sources={"x": {"kind": "default_code", "weight": 0.0}})
    check(r"unknown keys \['wieght'\]", sources={"x": {"kind": "default_code", "wieght": 1}})
    with pytest.raises(ValueError, match="multiple of the process count 2"):
        pipeline.train_iterator(_cfg(path=str(docs_dir)), tok, seq_len=32,
                                global_batch_size=3, seed=0, process_index=0, process_count=2)
    with pytest.raises(ValueError, match="fewer than the 64 processes"):
        pipeline.train_iterator(_cfg(path=str(docs_dir)), tok, seq_len=32,
                                global_batch_size=64, seed=0, process_index=0, process_count=64)
