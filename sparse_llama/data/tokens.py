"""Tokenized sources: every document of a source, framed and concatenated, cached on disk.

A source is tokenized once, up front: document d becomes x_d = [BOS] ids_d EOS (BOS when the
pipeline asks for it, packing.frame_document), and the x_d are concatenated into one flat array:

    tokens   (n,) uint16 (vocabularies up to 2**16 ids) or uint32
    bounds   (D + 1,) int64     document d is tokens[bounds[d]:bounds[d + 1]]
    id_hash  (D,) float64       sources.unit_hash of each document's id (the validation split)

so the pipeline can cut windows anywhere without re-tokenizing and a restart costs a file
open. The arrays live in `<cache>/tokens-<key>/` (tokens.bin raw, bounds.npy, id_hash.npy,
meta.json), written into a temporary directory renamed into place (a reader never sees a
partial entry; when two processes race, the first rename wins) and memory-mapped when read.
`<cache>` is data.token_cache, else `$SPARSE_LLAMA_CACHE/tokens` (default
~/.cache/sparse_llama/tokens). An unwritable cache only costs tokenizing again next time.

The key hashes what the tokens depend on: the source (kind, absolute path, text field or
split, and every file's relative path, size and mtime: an edited file is a new entry), the
tokenizer's full definition (`Tokenizer.fingerprint`) and whether BOS is added. Old entries
are never deleted; remove the directory to reclaim the space.

Tokenizing runs `num_threads` Python threads over jobs of `_JOB_DOCUMENTS` documents (reading
and parsing them, then `encode_batch`, which is itself parallel in Rust unless
TOKENIZERS_PARALLELISM=false) and writes the jobs' tokens to the file in document order, so
memory holds a few jobs, never a Python list per token. A document longer than
`_SEGMENT_CHARS` characters is encoded in segments cut at line starts where byte-level BPEs
(GPT-2, Llama 3) end a pre-token anyway (`_segments`), so the tokens are those of the whole
text; with other pre-tokenizers a cut can change the one token at it.
"""

import collections
import dataclasses
import hashlib
import io
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import numpy as np
from absl import logging

from sparse_llama.data import sources
from sparse_llama.data.tokenizer import Tokenizer
from sparse_llama.ground.cache import cache_dir

TOKENS_VERSION = 1  # bump when the layout or the framing changes: it keys the cache
_JOB_DOCUMENTS = 64  # documents per tokenizing job: amortises a call, keeps jobs small
_SEGMENT_CHARS = 1 << 18
_CALL_CHARS = 1 << 22  # characters per encode_batch call: bounds its Encodings' memory
_MEMO: dict[str, "TokenizedSource"] = {}  # key -> arrays, so data shards share one copy


@dataclasses.dataclass(frozen=True)
class TokenizedSource:
    """The framed tokens of every document of a source (see the module docstring)."""

    tokens: np.ndarray
    bounds: np.ndarray
    id_hash: np.ndarray

    @property
    def num_documents(self) -> int:
        return len(self.bounds) - 1


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id (halves the cache for 32k vocabs)."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def default_cache_dir() -> Path:
    return cache_dir() / "tokens"


def _segments(text: str) -> list[str]:
    """`text` cut into segments of at most _SEGMENT_CHARS, where possible just after a lone
    newline that follows a non-space and precedes a non-space character: there the GPT-2 and
    Llama 3 pre-tokenizers end a pre-token on both sides, so the cut changes no token (after
    a run of whitespace it would: the run is one pre-token at a text's end, two inside)."""
    out, start = [], 0
    while len(text) - start > _SEGMENT_CHARS:
        limit = start + _SEGMENT_CHARS
        cut = limit  # no good newline in the second half of the segment: a plain cut
        newline = text.rfind("\n", start + _SEGMENT_CHARS // 2, limit)
        while newline > start:
            if not (text[newline - 1].isspace() or text[newline + 1].isspace()):
                cut = newline + 1
                break
            newline = text.rfind("\n", start + _SEGMENT_CHARS // 2, newline)
        out.append(text[start:cut])
        start = cut
    out.append(text[start:])
    return out


def _encode_job(docs: sources.Documents, lo: int, hi: int, tokenizer: Tokenizer,
                bos_id: int | None, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(framed tokens, per-document lengths, id hashes) of documents lo..hi-1.

    Segments are encoded in calls of about _CALL_CHARS characters and turned into numpy at
    once, so a huge document never becomes one list of Python ints or of Encodings.
    """
    owners, texts = [], []
    for i in range(lo, hi):
        for segment in _segments(docs[i]):
            owners.append(i - lo)
            texts.append(segment)
    pieces: list[list[np.ndarray]] = [[] for _ in range(hi - lo)]
    first = 0
    while first < len(texts):
        last, chars = first, 0
        while last < len(texts) and (last == first or chars + len(texts[last]) <= _CALL_CHARS):
            chars += len(texts[last])
            last += 1
        for owner, ids in zip(owners[first:last], tokenizer.encode_batch(texts[first:last]),
                              strict=True):
            pieces[owner].append(np.asarray(ids, dtype))
        first = last
    # packing.frame_document's layout: [BOS] ids EOS.
    bos = np.asarray([] if bos_id is None else [bos_id], dtype)
    eos = np.asarray([tokenizer.eos_id], dtype)
    framed = [np.concatenate([bos, *doc, eos]) for doc in pieces]
    lengths = np.asarray([len(x) for x in framed], np.int64)
    flat = np.concatenate(framed) if framed else np.zeros(0, dtype)
    hashes = np.asarray([sources.unit_hash(docs.doc_id(i)) for i in range(lo, hi)], np.float64)
    return flat, lengths, hashes


def _jobs_in_order(docs: sources.Documents, run: Callable, threads: int) -> Iterator:
    """Results of `run(lo, hi)` over consecutive document ranges, in order, with at most a
    few jobs in flight (their tokens wait in memory until written)."""
    ranges = [(lo, min(lo + _JOB_DOCUMENTS, len(docs)))
              for lo in range(0, len(docs), _JOB_DOCUMENTS)]
    if threads <= 1:
        for lo, hi in ranges:
            yield run(lo, hi)
        return
    with futures.ThreadPoolExecutor(threads, thread_name_prefix="tokenize") as pool:
        pending: collections.deque = collections.deque()
        for lo, hi in ranges:
            pending.append(pool.submit(run, lo, hi))
            if len(pending) >= 2 * threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _tokenize_into(out, docs: sources.Documents, tokenizer: Tokenizer, *, bos_id: int | None,
                   dtype: np.dtype, threads: int) -> tuple[np.ndarray, np.ndarray]:
    """Write the framed tokens of `docs` to the binary file `out`; (bounds, id_hash)."""
    lengths, hashes = [], []

    def run(lo, hi):
        return _encode_job(docs, lo, hi, tokenizer, bos_id, dtype)

    for flat, job_lengths, job_hashes in _jobs_in_order(docs, run, threads):
        out.write(flat.tobytes())
        lengths.append(job_lengths)
        hashes.append(job_hashes)
    bounds = np.zeros(len(docs) + 1, np.int64)
    np.cumsum(np.concatenate(lengths), out=bounds[1:])
    return bounds, np.concatenate(hashes)


def _load_entry(directory: Path) -> TokenizedSource:
    meta = json.loads((directory / "meta.json").read_text())
    tokens = np.memmap(directory / "tokens.bin", dtype=np.dtype(meta["dtype"]), mode="r",
                       shape=(int(meta["tokens"]),))
    bounds = np.load(directory / "bounds.npy")
    id_hash = np.load(directory / "id_hash.npy")
    if bounds[-1] != len(tokens) or len(id_hash) != len(bounds) - 1:
        raise ValueError(f"{directory} is inconsistent (bounds, tokens and ids disagree)")
    return TokenizedSource(tokens, bounds, id_hash)


def _build_entry(final: Path, meta: dict, docs: sources.Documents, tokenizer: Tokenizer,
                 bos_id: int | None, dtype: np.dtype, threads: int) -> None:
    """Tokenize into a temporary directory next to `final`, then rename it into place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{uuid.uuid4().hex[:8]}.",
                                dir=final.parent))
    try:
        with open(tmp / "tokens.bin", "wb") as f:
            bounds, id_hash = _tokenize_into(f, docs, tokenizer, bos_id=bos_id, dtype=dtype,
                                             threads=threads)
        np.save(tmp / "bounds.npy", bounds)
        np.save(tmp / "id_hash.npy", id_hash)
        meta = {**meta, "tokens": int(bounds[-1]), "documents": len(docs)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide a shared cache from other users
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "meta.json").is_file():  # not another process's finished entry
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def tokenized(key_parts: list, read_documents: Callable[[], sources.Documents],
              tokenizer: Tokenizer, *, add_bos: bool, num_threads: int = 1,
              cache_dir: str | os.PathLike | None = None) -> TokenizedSource:
    """The tokenized source named by `key_parts` (JSON-able; see the module docstring),
    from the in-process memo, the disk cache, or `read_documents()` tokenized now."""
    bos_id = tokenizer.bos_id if add_bos else None
    dtype = token_dtype(tokenizer.vocab_size)
    ident = [TOKENS_VERSION, key_parts, tokenizer.fingerprint, bos_id, tokenizer.eos_id,
             dtype.name]
    key = hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:20]
    if key in _MEMO:
        return _MEMO[key]
    final = Path(cache_dir or default_cache_dir()).expanduser() / f"tokens-{key}"
    result = None
    if (final / "meta.json").is_file():
        try:
            result = _load_entry(final)
        except (OSError, ValueError, KeyError) as e:
            logging.warning("rebuilding the unreadable token cache %s: %s", final, e)
            shutil.rmtree(final, ignore_errors=True)  # else the rebuilt entry cannot replace it
    if result is None:
        docs = read_documents()
        if not len(docs):
            raise ValueError(f"no documents found in {docs.path}")
        threads = max(1, int(num_threads))
        meta = {"source": key_parts, "dtype": dtype.name, "bos_id": bos_id,
                "eos_id": tokenizer.eos_id, "tokenizer": tokenizer.fingerprint}
        try:
            _build_entry(final, meta, docs, tokenizer, bos_id, dtype, threads)
            result = _load_entry(final)
        except OSError as e:
            logging.warning("token cache %s not writable (%s): keeping tokens in memory",
                            final, e)
            buffer = io.BytesIO()
            bounds, id_hash = _tokenize_into(buffer, docs, tokenizer, bos_id=bos_id,
                                             dtype=dtype, threads=threads)
            result = TokenizedSource(np.frombuffer(buffer.getbuffer(), dtype), bounds, id_hash)
    _MEMO[key] = result
    return result
