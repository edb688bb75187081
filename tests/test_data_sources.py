"""Reading documents (text, JSONL, Parquet), their errors, the split, the embedded corpus."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sparse_llama.data import corpus, sources


@pytest.fixture(autouse=True, scope="module")
def _private_cache(tmp_path_factory):
    """Built artifacts (the prose corpus) go to this session's temp dir."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPARSE_LLAMA_CACHE", str(tmp_path_factory.getbasetemp() / "sl_cache"))
        yield


def _all(docs):
    return [docs[i] for i in range(len(docs))]


def test_text_folder_one_document_per_file(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "two.txt").write_text("second\n\nstill second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / ".hidden").write_text("never read")
    docs = sources.read_documents("text", tmp_path)
    assert _all(docs) == ["first", "second\n\nstill second"]
    assert [docs.doc_id(i) for i in range(len(docs))] == ["a.txt", "b/two.txt"]


def test_text_blank_line_split(tmp_path):
    file = tmp_path / "book.txt"
    file.write_text("\n\npara one\nline two\n\n  \n\npara two\n\n\n")
    # A single file is one document (a stream) by default; blank lines split only when asked.
    assert _all(sources.read_documents("text", file)) == [file.read_text()]
    assert _all(sources.read_documents("text", file, text_split="file")) == [file.read_text()]
    blocks = sources.read_documents("text", file, text_split="blank_lines")
    assert _all(blocks) == ["para one\nline two", "para two"]
    folder = sources.read_documents("text", tmp_path, text_split="blank_lines")
    assert [folder.doc_id(i) for i in range(len(folder))] == ["book.txt#0", "book.txt#1"]


def test_text_errors(tmp_path):
    with pytest.raises(ValueError, match=r"no documents found in .*: the folder has no files"):
        sources.read_documents("text", tmp_path)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="no documents found in .*every file is empty"):
        sources.read_documents("text", tmp_path)
    with pytest.raises(ValueError, match="no documents found in .*does not exist"):
        sources.read_documents("text", tmp_path / "nope")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    docs = sources.read_documents("text", tmp_path)
    with pytest.raises(ValueError, match=r"latin1\.txt: not UTF-8"):
        docs[0]


def test_fingerprint_changes_with_the_files(tmp_path):
    (tmp_path / "a.txt").write_text("one")
    before = sources.fingerprint(tmp_path)
    assert [name for name, *_ in before] == ["a.txt"] and before == sources.fingerprint(tmp_path)
    (tmp_path / "a.txt").write_text("one more")
    assert sources.fingerprint(tmp_path) != before
    (tmp_path / "b.txt").write_text("two")
    assert [name for name, *_ in sources.fingerprint(tmp_path)] == ["a.txt", "b.txt"]


def test_jsonl(tmp_path):
    file = tmp_path / "data.jsonl"
    file.write_text('{"body": "one", "n": 1}\n\n{"body": "two"}\n')
    docs = sources.read_documents("jsonl", file, text_field="body")
    assert _all(docs) == ["one", "two"]
    assert [docs.doc_id(i) for i in range(2)] == ["data.jsonl:1", "data.jsonl:3"]


def test_jsonl_missing_field_names_file_line_and_field(tmp_path):
    file = tmp_path / "data.jsonl"
    file.write_text('{"text": "ok"}\n{"text": "ok"}\n{"content": "oops"}\n')
    docs = sources.read_documents("jsonl", file)
    with pytest.raises(ValueError) as err:
        docs[2]
    assert "data.jsonl:3" in str(err.value) and "'text'" in str(err.value)
    assert "content" in str(err.value)  # the fields it does have
    # A wrong field on the first line fails at construction, not mid-run.
    with pytest.raises(ValueError, match=r"data.jsonl:1: no field 'body'"):
        sources.read_documents("jsonl", file, text_field="body")
    (tmp_path / "bad.jsonl").write_text('{"text": 3}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: field 'text' is a int"):
        sources.read_documents("jsonl", tmp_path / "bad.jsonl")
    (tmp_path / "blank.jsonl").write_text("\n \n")
    with pytest.raises(ValueError, match="no documents found in .*blank.jsonl"):
        sources.read_documents("jsonl", tmp_path / "blank.jsonl")


def test_parquet(tmp_path):
    pq.write_table(pa.table({"text": ["a", None, "", "b"], "id": [1, 2, 3, 4]}),
                   tmp_path / "p0.parquet")
    pq.write_table(pa.table({"text": ["c"], "id": [5]}), tmp_path / "p1.parquet")
    docs = sources.read_documents("parquet", tmp_path)
    assert _all(docs) == ["a", "b", "c"]
    assert [docs.doc_id(i) for i in range(3)] == ["p0.parquet:0", "p0.parquet:3", "p1.parquet:0"]
    with pytest.raises(ValueError, match=r"p0.parquet: no column 'body' \(columns"):
        sources.read_documents("parquet", tmp_path, text_field="body")
    with pytest.raises(ValueError, match="has type int64, not string"):
        sources.read_documents("parquet", tmp_path, text_field="id")


def test_infer_kind(tmp_path):
    assert sources.infer_kind(tmp_path / "x.jsonl") == "jsonl"
    assert sources.infer_kind(tmp_path / "x.parquet") == "parquet"
    assert sources.infer_kind(tmp_path / "x.txt") == "text"
    (tmp_path / "a.parquet").write_bytes(b"")
    assert sources.infer_kind(tmp_path) == "parquet"
    (tmp_path / "b.txt").write_text("x")
    assert sources.infer_kind(tmp_path) == "text"


def test_holdout_split_is_by_document_and_stable():
    ids = [f"doc{i}" for i in range(400)]
    docs = sources.DocumentList("mem", ids, ids)
    train, val = sources.holdout_split(docs, 0.1)
    train_ids, val_ids = set(_all(train)), set(_all(val))
    assert not train_ids & val_ids and train_ids | val_ids == set(ids)
    assert 20 <= len(val_ids) <= 60
    # A document's side depends on its id only: adding documents moves nobody.
    more = sources.DocumentList("mem", ids + ["x", "y"], ids + ["x", "y"])
    assert set(_all(sources.holdout_split(more, 0.1)[1])) - {"x", "y"} == val_ids
    tiny = sources.DocumentList("mem", ["a", "b"], ["a", "b"])
    assert len(sources.holdout_split(tiny, 0.01)[1]) == 1  # never an empty validation set
    with pytest.raises(ValueError, match="single document"):
        sources.holdout_split(sources.DocumentList("one", ["a"], ["a"]), 0.1)


def test_default_corpus_splits_are_disjoint_and_deterministic():
    for name in corpus.NAMES:
        docs = corpus.documents(name)
        ids = [docs.doc_id(i) for i in range(len(docs))]
        assert len(ids) > 300 and ids == sorted(ids) and len(set(ids)) == len(ids)
        train, val = corpus.split(name)
        train_idx, val_idx = set(train.indices.tolist()), set(val.indices.tolist())
        assert not train_idx & val_idx and train_idx | val_idx == set(range(len(docs)))
        assert 0.01 < len(val_idx) / len(docs) < 0.06
        # Recomputing from the ids alone gives the same split (nothing depends on order).
        expected = {i for i, d in enumerate(ids)
                    if sources.unit_hash(d.split("/", 1)[1]) < corpus.VALIDATION_FRACTION}
        assert val_idx == expected
    code = corpus.documents("code")
    assert all(isinstance(code[i], str) and code[i].strip() for i in range(0, len(code), 50))
    assert not any("site-packages" in code.doc_id(i) for i in range(len(code)))
    # A module's code and docstrings fall on the same side of the split.
    code_val = {v.doc_id(i).split("/", 1)[1] for v in [corpus.split("code")[1]]
                for i in range(len(v))}
    prose_val = {v.doc_id(i).split("/", 1)[1] for v in [corpus.split("prose")[1]]
                 for i in range(len(v)) if v.doc_id(i).startswith("docstrings/")}
    assert prose_val <= code_val


def test_prose_corpus_is_english():
    prose = corpus.documents("prose")
    ids = [prose.doc_id(i) for i in range(len(prose))]
    assert any(i.startswith("pydoc_topics/") for i in ids)
    assert any(i.startswith("docstrings/") for i in ids)
    text = " ".join(prose[i] for i in range(0, len(prose), 10))
    assert text.count(" the ") > 500


def test_prose_corpus_disk_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_LLAMA_CACHE", str(tmp_path))
    monkeypatch.setattr(corpus, "_build_prose", lambda: {"b": "second", "a": "first"})
    built = corpus.prose_documents.__wrapped__()  # bypass the in-process cache
    assert _all(built) == ["first", "second"]
    assert [p.name.startswith("corpus-prose-") for p in tmp_path.iterdir()] == [True]

    def no_build():
        raise AssertionError("the cached corpus should have been read")

    monkeypatch.setattr(corpus, "_build_prose", no_build)
    assert _all(corpus.prose_documents.__wrapped__()) == ["first", "second"]
