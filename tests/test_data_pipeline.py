"""Windows layout and invariants; the grain pipeline: streams and documents, global shuffle,
mixture, determinism, process shards, exact resume, held-out splits, the token cache, config
errors."""

import json
import re

import numpy as np
import pytest

from configs import blocks
from sparse_llama.data import packing, pipeline
from sparse_llama.data import tokenizer as tok_lib
from sparse_llama.data import tokens as tokens_lib

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
    cfg.num_threads = 1
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


def test_windows_are_random_access_rows_of_the_pair_stream():
    rng = np.random.default_rng(3)
    docs = [rng.integers(4, 100, size=rng.integers(0, 30)).tolist() for _ in range(20)]
    framed = [packing.frame_document(d, eos_id=2, bos_id=1) for d in docs]
    bounds = np.concatenate([[0], np.cumsum([len(x) for x in framed])])
    tokens = np.concatenate(framed).astype(np.uint16)
    windows = packing.Windows(tokens, packing.document_pieces(bounds), 7)
    _assert_same([windows[k] for k in range(len(windows))[::-1]][::-1],
                 packing.pack(docs, 7, eos_id=2, bos_id=1))
    assert windows.pairs == sum(len(d) + 1 for d in docs)
    with pytest.raises(IndexError):
        windows[len(windows)]
    # A subset of documents is its own stream: document 3 then document 0.
    sub = packing.Windows(tokens, packing.document_pieces(bounds, np.array([3, 0])), 64)
    _assert_same([sub[0]], packing.pack([docs[3], docs[0]], 64, eos_id=2, bos_id=1))


def test_tail_split_cuts_the_pair_stream():
    pieces = packing.Pieces(np.array([0, 10, 20]), np.array([5, 3, 2]))
    head, tail = packing.tail_split(pieces, 0.4)  # 10 pairs: the last 4 held out
    assert head.starts.tolist() == [0, 10] and head.lengths.tolist() == [5, 1]
    assert tail.starts.tolist() == [11, 20] and tail.lengths.tolist() == [2, 2]
    head, tail = packing.tail_split(pieces, 0.0)
    assert head.total == 10 and tail.total == 0
    one = packing.Pieces(np.array([0]), np.array([1000]))
    head, tail = packing.tail_split(one, 0.0001)  # never an empty validation tail
    assert (head.total, tail.total, tail.starts.tolist()) == (999, 1, [999])


# ----------------------------------------------------------------------------- pipeline


def _iterator(cfg, tok, *, seq_len=32, batch=4, seed=0, process_index=0, process_count=1):
    return pipeline.train_iterator(cfg, tok, seq_len=seq_len, global_batch_size=batch,
                                   seed=seed, process_index=process_index,
                                   process_count=process_count)


def _row_keys(batches) -> list[bytes]:
    """Each row as bytes (its identity), in order."""
    return [np.concatenate([b[k][r].astype(np.int64) for k in sorted(KEYS)]).tobytes()
            for b in batches for r in range(b["inputs"].shape[0])]


def test_batches_have_the_documented_format(tok, docs_dir):
    it = _iterator(_cfg(path=str(docs_dir)), tok)
    for b in _take(it, 3):
        assert set(b) == KEYS
        for k in KEYS:
            assert b[k].shape == (4, 32)
            assert b[k].dtype == (np.float32 if k == "loss_mask" else np.int32)
        assert b["inputs"].max() < tok.vocab_size
        # Only a source's last window can be padded, and only at its end.
        real = b["segment_ids"] > 0
        np.testing.assert_array_equal(b["loss_mask"], real.astype(np.float32))
        assert np.all(np.diff(real.astype(int), axis=1) <= 0)


def test_a_text_file_is_one_stream_unless_split_on_blank_lines_is_asked(tok, tmp_path):
    rng = np.random.default_rng(5)
    book = tmp_path / "book.txt"
    book.write_text("\n\n".join(_doc(i, rng) for i in range(30)))
    cfg = _cfg(path=str(book), validation_fraction=0.0, shuffle=False)
    batches = _take(_iterator(cfg, tok, batch=2), 4)
    stream = np.concatenate([r for b in batches for r in b["inputs"]])
    assert np.all(np.concatenate([b["segment_ids"] for b in batches]) == 1)
    for b in batches:
        np.testing.assert_array_equal(b["positions"], np.tile(np.arange(32), (2, 1)))
        np.testing.assert_array_equal(b["targets"][:, :-1], b["inputs"][:, 1:])
    assert stream[0] == tok.bos_id and np.sum(stream == tok.bos_id) == 1  # BOS: file start
    expected = tok.encode(book.read_text())[:len(stream) - 1]
    np.testing.assert_array_equal(stream[1:], expected)
    # text_split="blank_lines": every paragraph is its own BOS-framed document.
    cfg.text_split = "blank_lines"
    b = next(_iterator(cfg, tok, batch=2))
    assert b["segment_ids"].max() > 1 and np.sum(b["inputs"] == tok.bos_id) > 2


def test_jsonl_records_keep_their_boundaries(tok, tmp_path):
    rng = np.random.default_rng(6)
    texts = [_doc(i, rng) for i in range(25)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    cfg = _cfg(path=str(data), validation_fraction=0.0, shuffle=False)
    rows = [r for b in _take(_iterator(cfg, tok, seq_len=48, batch=2), 6)
            for r in zip(*(b[k] for k in sorted(KEYS)), strict=True)]
    pairs = []
    for inputs, loss_mask, positions, segment_ids, targets in rows:
        for seg in np.unique(segment_ids[loss_mask > 0]):
            idx = segment_ids == seg
            np.testing.assert_array_equal(positions[idx], np.arange(idx.sum()))
            np.testing.assert_array_equal(targets[idx][:-1], inputs[idx][1:])
        pairs += list(zip(inputs[loss_mask > 0].tolist(), targets[loss_mask > 0].tolist(),
                          strict=True))
    # The stream of (input, target) pairs is each record framed [BOS] text EOS, in order.
    examples = [packing.document_example(tok.encode(t), eos_id=tok.eos_id, bos_id=tok.bos_id)
                for t in texts]
    expected = [(int(a), int(b)) for e in examples
                for a, b in zip(e["inputs"], e["targets"], strict=True)]
    assert pairs == expected[:len(pairs)] and len(pairs) > len(expected) // 2


def test_an_epoch_is_a_permutation_of_every_window(tok, docs_dir):
    """Global shuffle: the first epoch holds every window exactly once, in a seeded order."""
    cfg = _cfg(path=str(docs_dir), validation_fraction=0.0, shuffle=False)
    in_order = _row_keys(_take(_iterator(cfg, tok, batch=1), 200))
    n = in_order.index(in_order[0], 1)  # windows per epoch: the stream restarts
    assert 10 < n < 200 and in_order[:n] == in_order[n:2 * n] and len(set(in_order[:n])) == n
    cfg.shuffle = True
    epochs = _row_keys(_take(_iterator(cfg, tok, batch=1), 2 * n))
    assert sorted(epochs[:n]) == sorted(epochs[n:]) == sorted(in_order[:n])
    assert epochs[:n] != in_order[:n] and epochs[:n] != epochs[n:]  # a new order per epoch


def test_mixture_proportions(tok, tmp_path):
    for name, letter in (("a", "a"), ("z", "z")):
        (tmp_path / name).mkdir()
        for i in range(5):
            (tmp_path / name / f"{i}.txt").write_text(f"{letter} {letter * 2} " * (3 + i))
    sources = {"a": {"kind": "text", "path": str(tmp_path / "a"), "weight": 3.0},
               "z": {"kind": "text", "path": str(tmp_path / "z"), "weight": 1.0}}
    cfg = _cfg(seq_len=8, sources=sources, validation_fraction=0.0)
    it = _iterator(cfg, tok, seq_len=8, batch=8)
    counts = {"a": 0, "z": 0}
    for b in _take(it, 50):
        for row in b["inputs"]:
            text = tok.decode(row, skip_special_tokens=True)
            assert text.strip(" az") == "" and not ("a" in text and "z" in text)
            counts["a" if "a" in text else "z"] += 1
    assert abs(counts["a"] / 400 - 0.75) < 0.03


def test_same_seed_same_batches_other_seed_other_batches(tok, docs_dir):
    def first(seed):
        return _take(_iterator(_cfg(path=str(docs_dir)), tok, seed=seed), 4)

    _assert_same(first(0), first(0))
    assert not all(np.array_equal(x["inputs"], y["inputs"])
                   for x, y in zip(first(0), first(1), strict=True))


def test_process_shards_are_disjoint_and_cover(tok, tmp_path):
    """Shard p of P holds rows p, p + P, ... of the one global sequence: any P sees the same
    global batches; and a single file (one document) shards as well as a folder."""
    rng = np.random.default_rng(7)
    book = tmp_path / "book.txt"
    book.write_text(" ".join(_doc(i, rng) for i in range(40)))
    cfg = _cfg(path=str(book))
    whole = _row_keys(_take(_iterator(cfg, tok, batch=6), 10))
    shards = [_row_keys(_take(_iterator(cfg, tok, batch=6, process_index=p, process_count=3),
                              10)) for p in range(3)]
    for g in range(10):  # global batch g: the same rows, shard p holding its p-th third
        rows = [shards[p][2 * g:2 * g + 2] for p in range(3)]
        assert sorted(sum(rows, [])) == sorted(whole[6 * g:6 * g + 6])
        assert rows[1] == [whole[6 * g + 1], whole[6 * g + 4]]
    assert next(_iterator(cfg, tok, batch=6, process_index=2,
                          process_count=3))["inputs"].shape == (2, 32)


def test_resume_continues_with_exactly_the_next_batches(tok, docs_dir, tmp_path):
    (tmp_path / "b").mkdir()
    for i in range(12):
        (tmp_path / "b" / f"{i}.txt").write_text(f"<{100 + i}> gamma delta " * (2 + i))
    sources = {"docs": {"kind": "text", "path": str(docs_dir), "weight": 0.6},
               "more": {"kind": "text", "path": str(tmp_path / "b"), "weight": 0.4}}
    cfg = _cfg(seq_len=16, sources=sources, prefetch_batches=2, num_threads=2)

    def make():
        return _iterator(cfg, tok, seq_len=16, seed=3)

    it = make()
    _take(it, 7)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    expected = _take(it, 40)  # past an epoch of both sources
    restored = make()
    restored.set_state(state)
    _assert_same(expected, _take(restored, 40))
    it.set_state(state)  # rewinding the same iterator works too
    _assert_same(expected, _take(it, 40))
    it.close()
    restored.close()
    # A state of other data (here another seq_len) is refused, not silently misread.
    other = _iterator(cfg, tok, seq_len=8, seed=3)
    with pytest.raises(ValueError, match="another data layout"):
        other.set_state(state)
    with pytest.raises(ValueError, match="another data layout"):
        other.set_state({"parent": {"next_index": 3}, "offset": 0})  # the packer's old state


def test_a_single_file_holds_out_its_tail(tok, tmp_path):
    rng = np.random.default_rng(2)
    book = tmp_path / "book.txt"
    book.write_text("\n\n".join(_doc(i, rng) for i in range(60)))
    cfg = _cfg(path=str(book), validation_fraction=0.1)
    train_seen = set().union(*_doc_ids(tok, _take(_iterator(cfg, tok), 60)))
    evals = pipeline.eval_batches(cfg, tok, seq_len=32, batch_size=4)
    eval_seen = set().union(*_doc_ids(tok, evals))
    # The tail: the last ~10% of the text; at most the document cut in two is on both sides.
    assert 3 <= len(eval_seen) <= 9 and max(eval_seen) == 59
    assert len(train_seen & eval_seen) <= 1 and max(train_seen) <= min(eval_seen)
    assert train_seen | eval_seen == set(range(60))
    last = evals[-1]
    assert last["inputs"].shape == (4, 32) and last["loss_mask"][-1].sum() < 32  # padded
    _assert_same(evals, pipeline.eval_batches(cfg, tok, seq_len=32, batch_size=4))
    assert len(pipeline.eval_batches(cfg, tok, seq_len=8, batch_size=2, max_batches=3)) == 3


def test_documents_are_held_out_by_document(tok, tmp_path):
    rng = np.random.default_rng(2)
    book = tmp_path / "book.txt"
    book.write_text("\n\n".join(_doc(i, rng) for i in range(60)))
    cfg = _cfg(path=str(book), validation_fraction=0.1, text_split="blank_lines")
    train_seen = set().union(*_doc_ids(tok, _take(_iterator(cfg, tok), 80)))
    evals = pipeline.eval_batches(cfg, tok, seq_len=32, batch_size=4)
    eval_seen = set().union(*_doc_ids(tok, evals))
    assert eval_seen and not train_seen & eval_seen
    assert train_seen | eval_seen == set(range(60))


def test_eval_path_replaces_the_held_out_split(tok, docs_dir, tmp_path):
    held = tmp_path / "held.txt"
    held.write_text("<900> alpha beta\n\n<901> gamma delta")
    cfg = _cfg(path=str(docs_dir), eval_path=str(held))
    evals = pipeline.eval_batches(cfg, tok, seq_len=32, batch_size=2)
    assert set().union(*_doc_ids(tok, evals)) == {900, 901}
    it = _iterator(cfg, tok)
    assert set().union(*_doc_ids(tok, _take(it, 40))) == set(range(40))  # nothing held out


def test_tokens_are_cached_on_disk_by_content(tok, tmp_path, monkeypatch):
    book = tmp_path / "book.txt"
    book.write_text("<1> alpha beta gamma " * 40)
    cache = tmp_path / "cache"
    cfg = _cfg(path=str(book), token_cache=str(cache), validation_fraction=0.0, shuffle=False)
    first = next(_iterator(cfg, tok))
    assert len(list(cache.glob("tokens-*/tokens.bin"))) == 1
    monkeypatch.setattr(tokens_lib, "_MEMO", {})  # a new process: only the disk cache is left

    def no_read(*args, **kwargs):
        raise AssertionError("the cached tokens should have been read")

    monkeypatch.setattr(pipeline, "_read", no_read)
    _assert_same([first], [next(_iterator(cfg, tok))])
    monkeypatch.undo()
    book.write_text("<2> delta delta " * 40)  # an edited file is a new cache entry
    assert tok.decode(next(_iterator(cfg, tok))["inputs"][0]).count("<2>") > 3
    assert len(list(cache.glob("tokens-*/tokens.bin"))) == 2


def test_long_documents_are_tokenized_in_pieces_at_line_starts(tok, monkeypatch):
    monkeypatch.setattr(tokens_lib, "_SEGMENT_CHARS", 200)
    text = "".join(f"line {i} alpha beta\n" + ("  indented\n\n" if i % 3 else "")
                   for i in range(40))
    segments = tokens_lib._segments(text)
    assert "".join(segments) == text and len(segments) > 4
    assert all(len(s) <= 200 and s.endswith("\n") and not s[-2].isspace()
               for s in segments[:-1])
    assert all(not s[0].isspace() for s in segments)
    assert sum((tok.encode(s) for s in segments), []) == tok.encode(text)


def test_default_mixture():
    tok = tok_lib.default_tokenizer(512)
    cfg = _cfg(seq_len=64, num_threads=2)
    assert [(s.name, s.kind, s.weight) for s in pipeline.mixture(cfg)] == [
        ("code", "default_code", pytest.approx(0.3)), ("text", "default_prose", 0.7)]
    it = _iterator(cfg, tok, seq_len=64)
    b = next(it)
    assert b["inputs"].shape == (4, 64) and np.all(b["loss_mask"] == 1)
    evals = pipeline.eval_batches(cfg, tok, seq_len=64, batch_size=4, max_batches=3)
    assert len(evals) == 3 and evals[0]["targets"].shape == (4, 64)


def test_config_errors(tok, docs_dir, tmp_path):
    def check(match, **overrides):
        with pytest.raises(ValueError, match=match):
            _iterator(_cfg(**overrides), tok, process_count=2)

    check("kind must be one of", sources={"x": {"kind": "csv", "path": str(docs_dir)}})
    check("takes no path", sources={"x": {"kind": "default_code", "path": str(docs_dir)}})
    check("needs a path", sources={"x": {"kind": "jsonl"}})
    check("weight must be positive", sources={"x": {"kind": "default_code", "weight": 0.0}})
    check(r"unknown keys \['wieght'\]", sources={"x": {"kind": "default_code", "wieght": 1}})
    check(r"data.shuffle_buffer is no longer a setting: .*shuffled globally",
          shuffle_buffer=128)
    check(r"data.text_split must be one of", text_split="paragraphs")
    check(r"data.validation_fraction must be in \[0, 1\)", validation_fraction=1.0)
    check("no documents found in .*does not exist", path=str(tmp_path / "nope.txt"))
    (tmp_path / "blank.jsonl").write_text("\n\n")
    check("no documents found in .*blank.jsonl", path=str(tmp_path / "blank.jsonl"))
    with pytest.raises(ValueError, match="multiple of the process count 2"):
        pipeline.train_iterator(_cfg(path=str(docs_dir)), tok, seq_len=32,
                                global_batch_size=3, seed=0, process_index=0, process_count=2)
    with pytest.raises(ValueError, match="no validation data"):
        pipeline.eval_batches(_cfg(path=str(docs_dir), validation_fraction=0.0), tok,
                              seq_len=32, batch_size=2)
