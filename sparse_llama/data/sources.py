"""Documents: read text, JSONL and Parquet sources; split them into train / validation.

A source is a random-access sequence of documents: `len(docs)`, `docs[i] -> str` and
`docs.doc_id(i) -> str` (a stable name such as "notes/a.txt" or "part-0.jsonl:17"), plus
`docs.path` for error messages. grain's `MapDataset.source` takes them as they are.

Readers (the `READERS` registry, chosen by a source's `kind`):
  text     a file or a folder (recursively, hidden and empty files skipped); one document per
           file (`text_split` "auto" or "file": a single file is one document, i.e. one token
           stream), or, only when asked ("blank_lines"), one per blank-line separated block.
  jsonl    a file or a folder of *.jsonl / *.json files, one JSON object per line; the document
           is the string under `text_field`. Lines are indexed up front and parsed on access.
  parquet  a file or a folder of *.parquet files; the document is the `text_field` column
           (null and empty values skipped). The column is held in memory (Arrow buffers).
Empty or unreadable data raises ValueError("no documents found in PATH: why").
"""

import bisect
import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

TEXT_SPLITS = ("auto", "file", "blank_lines")
_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n")


@runtime_checkable
class Documents(Protocol):
    """A random-access sequence of documents (str)."""

    path: str

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> str: ...

    def doc_id(self, i: int) -> str: ...


def _no_documents(path, why: str) -> ValueError:
    return ValueError(f"no documents found in {path}: {why}")


def _list_files(path: Path, suffixes: tuple[str, ...] | None) -> list[Path]:
    """`path` itself, or the files under it (sorted, recursive, hidden entries skipped)."""
    if not path.exists():
        raise _no_documents(path, "the path does not exist")
    if path.is_file():
        return [path]
    files = []
    for root, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if not name.startswith(".") and (suffixes is None or name.endswith(suffixes)):
                files.append(Path(root) / name)
    if not files:
        wanted = "files" if suffixes is None else f"files ending in {' / '.join(suffixes)}"
        raise _no_documents(path, f"the folder has no {wanted}")
    return files


def _relative(file: Path, root: Path) -> str:
    return file.name if root.is_file() else file.relative_to(root).as_posix()


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"cannot read {file}: not UTF-8 text ({e.reason} at byte {e.start})"
                         ) from e
    except OSError as e:
        raise ValueError(f"cannot read {file}: {e}") from e


@dataclasses.dataclass(frozen=True)
class DocumentList:
    """Documents held in memory, with their ids."""

    path: str
    texts: Sequence[str]
    ids: Sequence[str]

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> str:
        return self.texts[i]

    def doc_id(self, i: int) -> str:
        return self.ids[i]


@dataclasses.dataclass(frozen=True)
class TextFiles:
    """One document per file, read when accessed."""

    path: str
    files: Sequence[Path]
    ids: Sequence[str]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> str:
        return _read_text(self.files[i])

    def doc_id(self, i: int) -> str:
        return self.ids[i]


@dataclasses.dataclass(frozen=True)
class JsonlDocuments:
    """One document per non-blank JSONL line; `offsets` index the lines of all files."""

    path: str
    files: Sequence[Path]
    ids: Sequence[str]
    text_field: str
    file_index: np.ndarray  # (n,) int32: which file
    offsets: np.ndarray  # (n,) int64: byte offset of the line
    line_numbers: np.ndarray  # (n,) int64: 1-based line number, for messages

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> str:
        file, line = self.files[self.file_index[i]], int(self.line_numbers[i])
        with open(file, "rb") as f:
            f.seek(int(self.offsets[i]))
            raw = f.readline()
        return _jsonl_text(raw, file, line, self.text_field)

    def doc_id(self, i: int) -> str:
        return f"{self.ids[self.file_index[i]]}:{int(self.line_numbers[i])}"


def _jsonl_text(raw: bytes, file: Path, line: int, field: str) -> str:
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}:{line}: invalid JSON: {e}") from e
    if not isinstance(record, dict):
        raise ValueError(f"{file}:{line}: expected a JSON object, got {type(record).__name__}")
    if field not in record:
        raise ValueError(f"{file}:{line}: no field {field!r} (fields: {sorted(record)}); "
                         "set the source's text_field")
    text = record[field]
    if not isinstance(text, str):
        raise ValueError(f"{file}:{line}: field {field!r} is a {type(text).__name__}, "
                         "not a string")
    return text


@dataclasses.dataclass(frozen=True)
class ParquetDocuments:
    """One document per non-empty value of a string column, held as Arrow arrays."""

    path: str
    columns: Sequence[pa.Array]  # one per file
    ids: Sequence[str]
    rows: Sequence[np.ndarray]  # per file: the rows with a non-empty value
    starts: Sequence[int]  # cumulative document counts, starts[0] == 0

    def __len__(self) -> int:
        return self.starts[-1]

    def _locate(self, i: int) -> tuple[int, int]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        f = bisect.bisect_right(self.starts, i) - 1
        return f, int(self.rows[f][i - self.starts[f]])

    def __getitem__(self, i: int) -> str:
        f, row = self._locate(i)
        return self.columns[f][row].as_py()

    def doc_id(self, i: int) -> str:
        f, row = self._locate(i)
        return f"{self.ids[f]}:{row}"


@dataclasses.dataclass(frozen=True)
class Subset:
    """A view of `parent` at `indices` (a split or a shard)."""

    parent: Documents
    indices: np.ndarray

    @property
    def path(self) -> str:
        return self.parent.path

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> str:
        return self.parent[int(self.indices[i])]

    def doc_id(self, i: int) -> str:
        return self.parent.doc_id(int(self.indices[i]))


def read_text(path: str | os.PathLike, *, text_split: str = "auto", **_) -> Documents:
    """Text file(s). text_split: "auto" or "file" (one document per file: a single file is one
    document), "blank_lines" (one per block separated by blank lines).

    "auto" is "file" because pretraining text is a stream: cutting a book or a wiki dump at
    every blank line into BOS-framed documents whose attention stops at the paragraph end
    teaches a model short contexts (measured: it raised a trained model's perplexity).
    """
    if text_split not in TEXT_SPLITS:
        raise ValueError(f"text_split must be one of {TEXT_SPLITS}, got {text_split!r}")
    root = Path(path).expanduser()
    files = [f for f in _list_files(root, None) if f.stat().st_size > 0]
    if not files:
        raise _no_documents(root, "every file is empty")
    names = [_relative(f, root) for f in files]
    if text_split in ("auto", "file"):
        return TextFiles(str(root), files, names)
    texts, ids = [], []
    for file, name in zip(files, names, strict=True):
        blocks = (b.strip("\n") for b in _BLANK_LINE.split(_read_text(file)))
        for k, block in enumerate(b for b in blocks if b.strip()):
            texts.append(block)
            ids.append(f"{name}#{k}")
    if not texts:
        raise _no_documents(root, "the files hold only whitespace")
    return DocumentList(str(root), texts, ids)


def read_jsonl(path: str | os.PathLike, *, text_field: str = "text", **_) -> Documents:
    """JSON-lines file(s); the document is the string under `text_field`."""
    root = Path(path).expanduser()
    files = _list_files(root, (".jsonl", ".json"))
    file_index, offsets, line_numbers = [], [], []
    for k, file in enumerate(files):
        offset = 0
        with open(file, "rb") as f:
            for number, raw in enumerate(f, start=1):
                if raw.strip():
                    file_index.append(k)
                    offsets.append(offset)
                    line_numbers.append(number)
                offset += len(raw)
    if not offsets:
        raise _no_documents(root, "the files have no non-blank lines")
    docs = JsonlDocuments(str(root), files, [_relative(f, root) for f in files], text_field,
                          np.asarray(file_index, np.int32), np.asarray(offsets, np.int64),
                          np.asarray(line_numbers, np.int64))
    docs[0]  # noqa: B018 -- fail now, not mid-run, when the field is wrong
    return docs


def read_parquet(path: str | os.PathLike, *, text_field: str = "text", **_) -> Documents:
    """Parquet file(s); the document is the string column `text_field`."""
    root = Path(path).expanduser()
    columns, rows, ids, starts = [], [], [], [0]
    for file in _list_files(root, (".parquet",)):
        try:
            schema = pq.read_schema(file)
            if text_field not in schema.names:
                raise ValueError(f"no column {text_field!r} (columns: {schema.names}); "
                                 "set the source's text_field")
            column = pq.read_table(file, columns=[text_field]).column(text_field).combine_chunks()
        except (OSError, ValueError, pa.ArrowException) as e:
            raise ValueError(f"cannot read {file}: {e}") from e
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            raise ValueError(f"cannot read {file}: column {text_field!r} has type "
                             f"{column.type}, not string")
        keep = pc.fill_null(pc.greater(pc.utf8_length(column), 0), False)
        columns.append(column)
        rows.append(np.flatnonzero(keep.to_numpy(zero_copy_only=False)))
        ids.append(_relative(file, root))
        starts.append(starts[-1] + len(rows[-1]))
    if starts[-1] == 0:
        raise _no_documents(root, f"column {text_field!r} has no non-empty value")
    return ParquetDocuments(str(root), columns, ids, rows, starts)


def infer_kind(path: str | os.PathLike) -> str:
    """"parquet" / "jsonl" for such a file or a folder of only such files, else "text"."""
    path = Path(path).expanduser()
    if path.is_dir():
        names = [f.name for f in _list_files(path, None)]
    else:
        names = [path.name]
    for kind, suffixes in (("parquet", (".parquet",)), ("jsonl", (".jsonl", ".json"))):
        if all(name.endswith(suffixes) for name in names):
            return kind
    return "text"


READERS: dict[str, Callable[..., Documents]] = {
    "text": read_text,
    "jsonl": read_jsonl,
    "parquet": read_parquet,
}


def read_documents(kind: str, path: str | os.PathLike, *, text_field: str = "text",
                   text_split: str = "auto") -> Documents:
    """Documents of a source of kind `kind` (a key of READERS) at `path`."""
    if kind not in READERS:
        raise ValueError(f"unknown source kind {kind!r}; file kinds: {sorted(READERS)}")
    if not str(path):
        raise ValueError(f"a {kind!r} source needs a path")
    return READERS[kind](path, text_field=text_field, text_split=text_split)


def fingerprint(path: str | os.PathLike) -> list:
    """[relative path, size, mtime_ns] of every file under `path` (or of the file): what a
    cache of data read from `path` must be keyed by, found without reading the files."""
    root = Path(path).expanduser()
    files = _list_files(root, None)
    return [[_relative(f, root), st.st_size, st.st_mtime_ns]
            for f in files for st in [f.stat()]]


def unit_hash(doc_id: str) -> float:
    """A uniform number in [0, 1) fixed by the document id (same on every machine)."""
    digest = hashlib.blake2b(doc_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def holdout_split(docs: Documents, fraction: float,
                  group: Callable[[str], str] | None = None) -> tuple[Subset, Subset]:
    """(train, validation) by document: a document is held out when hash(id) < fraction.

    Deterministic and stable under adding files (each document's fate depends on its id
    only). `group(id)` replaces the id in the hash when related documents must share a side.
    With fraction > 0 at least one document is held out, so a small source still has a
    validation set; a source of one document cannot be split (ValueError).
    """
    group = group or (lambda doc_id: doc_id)
    u = np.asarray([unit_hash(group(docs.doc_id(i))) for i in range(len(docs))])
    held = holdout_mask(u, fraction, docs.path)
    return Subset(docs, np.flatnonzero(~held)), Subset(docs, np.flatnonzero(held))


def holdout_mask(u: np.ndarray, fraction: float, path: str) -> np.ndarray:
    """Which documents are held out, from their id hashes `u` (holdout_split's rule)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    if fraction > 0 and len(u) < 2:
        raise ValueError(
            f"cannot hold out a validation document from {path}: it has a single "
            "document (give an eval_path, or split the text on blank lines)")
    held = np.asarray(u) < fraction
    if fraction > 0 and not held.any():
        held[np.argmin(u)] = True
    if held.all():
        held[np.argmax(u)] = False
    return held
