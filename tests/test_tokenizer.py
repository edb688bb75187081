"""Tokenizer wrapper: BPE training, round trips, save/load (ours and Hugging Face's), the
cached default tokenizer, the vocabulary check."""

import json
import os

import pytest
import tokenizers

from sparse_llama.data import tokenizer as tok_lib

TEXTS = [
    "The quick brown fox jumps over the lazy dog.\n" * 3,
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n",
    "Packing documents into rows keeps every token of the batch useful.",
    "Sparse models prune weights; dense ones keep them all. " * 2,
]
TRICKY = "naïve café — 日本語 🙂\n\tdef f(x):  return x ** 2  # ok\r\n"


@pytest.fixture(scope="module")
def small():
    return tok_lib.train_bpe(TEXTS, vocab_size=300)


@pytest.fixture(autouse=True, scope="module")
def cache(tmp_path_factory):
    """Built artifacts (prose corpus, default tokenizer) go to this session's temp dir."""
    path = tmp_path_factory.getbasetemp() / "sl_cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPARSE_LLAMA_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def default_tok(cache):
    """The embedded default tokenizer, trained at most once per session."""
    return tok_lib.default_tokenizer(512), cache


def test_specials_and_round_trip(small):
    assert (small.bos_id, small.eos_id, small.pad_id) == (0, 1, 3)
    assert small.token(small.bos_id) == "<s>" and small.token(small.eos_id) == "</s>"
    assert small.vocab_size == 300
    ids = small.encode(TRICKY)
    assert small.bos_id not in ids and small.eos_id not in ids  # no specials added
    assert small.decode(ids) == TRICKY  # byte-level: lossless on any text
    assert small.encode_batch([TRICKY, "x"]) == [ids, small.encode("x")]


def test_train_bpe_rejects_tiny_vocab():
    with pytest.raises(ValueError, match="vocab_size must be >= 260"):
        tok_lib.train_bpe(TEXTS, vocab_size=100)


def test_save_then_load_file_and_dir(small, tmp_path):
    directory = small.save(tmp_path / "tok")
    assert {p.name for p in directory.iterdir()} == {
        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    for path in (directory, directory / "tokenizer.json"):
        loaded = tok_lib.load_tokenizer(path)
        assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (0, 1, 3)
        assert loaded.encode(TRICKY) == small.encode(TRICKY)
        assert loaded.fingerprint == small.fingerprint


def test_transformers_loads_saved_tokenizer(small, tmp_path):
    transformers = pytest.importorskip("transformers")
    directory = small.save(tmp_path / "tok")
    ids = small.encode(TRICKY)
    auto = transformers.AutoTokenizer.from_pretrained(str(directory))
    assert auto.bos_token == "<s>" and auto.eos_token == "</s>" and auto.pad_token == "<pad>"
    assert auto(TRICKY)["input_ids"] == [small.bos_id, *ids]  # HF users get BOS, like Llama
    assert auto.decode(ids) == TRICKY
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(directory / "tokenizer.json"))
    assert fast(TRICKY, add_special_tokens=False)["input_ids"] == ids


def _bare_tokenizer_json(path, vocab):
    """A word-level tokenizer.json with the given vocabulary and no metadata files."""
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token=next(iter(vocab))))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    backend.save(str(path))


def test_load_reads_hugging_face_metadata(tmp_path):
    _bare_tokenizer_json(tmp_path / "tokenizer.json",
                         {"[UNK]": 0, "hello": 1, "[END]": 2, "[START]": 3, "<|eot|>": 4})
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "[START]", "special": True}, "eos_token": "[END]"}))
    loaded = tok_lib.load_tokenizer(tmp_path)
    assert (loaded.bos_id, loaded.eos_id) == (3, 2)
    # config.json alone (Llama 3 lists several EOS ids: the first one is used).
    (tmp_path / "tokenizer_config.json").unlink()
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [4, 2]}))
    loaded = tok_lib.load_tokenizer(tmp_path)
    assert (loaded.bos_id, loaded.eos_id) == (None, 4)


def test_load_errors(tmp_path):
    _bare_tokenizer_json(tmp_path / "tokenizer.json", {"[UNK]": 0, "hello": 1})
    with pytest.raises(ValueError, match="cannot tell the EOS token"):
        tok_lib.load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="no tokenizer found"):
        tok_lib.load_tokenizer(tmp_path / "missing")
    (tmp_path / "sp").mkdir()
    (tmp_path / "sp" / "tokenizer.model").write_bytes(b"\0")
    with pytest.raises(ValueError, match="sentencepiece"):
        tok_lib.load_tokenizer(tmp_path / "sp")


def test_check_vocab(small):
    tok_lib.check_vocab(small, 300)
    tok_lib.check_vocab(small, 512)
    with pytest.raises(ValueError, match="300 ids but the model's embedding has only 256"):
        tok_lib.check_vocab(small, 256)


def test_default_tokenizer_is_cached_atomically(default_tok, monkeypatch):
    tok, cache = default_tok
    assert tok.vocab_size == 512 and tok.bos_id == 0 and tok.eos_id == 1
    code = "for i in range(10):\n    print(i)\n"
    assert tok.decode(tok.encode(code)) == code
    entries = sorted(os.listdir(cache))
    assert not [e for e in entries if e.startswith(".")]  # no temporary leftovers
    assert len([e for e in entries if e.startswith("tokenizer-bpe512-")]) == 1

    def no_training(*args, **kwargs):
        raise AssertionError("the cached tokenizer should have been reused")

    monkeypatch.setenv("SPARSE_LLAMA_CACHE", str(cache))
    monkeypatch.setattr(tok_lib, "train_bpe", no_training)
    again = tok_lib.default_tokenizer(512)
    assert again.fingerprint == tok.fingerprint
