"""The embedded default corpus: text that ships with Python itself, so a fresh machine has it.

Two corpora, each a sorted, deterministic list of documents (sources.Documents):
  code   the standard library's own `.py` files, one document per file (a stand-in for the
         Python subset of The Stack). Ids "stdlib/<relative path>".
  prose  English that ships with Python: the reference-manual topics of `pydoc_data.topics`
         (one document per topic, "pydoc_topics/<name>"), each stdlib module's docstrings
         (module, class and function docstrings joined by blank lines, "docstrings/<path>"),
         and the stdlib's .txt / .rst files ("stdlib_text/<path>").

Left out: site-packages / dist-packages (they depend on what is installed), the `test`
packages (an optional Debian package, so their presence varies between images; they also
hold deliberately broken files) and `pydoc_data` (prose, used above). Files that are not UTF-8
are skipped. The corpus thus depends only on the Python build (`sys.version`); with Python
3.11.7 it is 730 code documents (11.4 MB) and 711 prose documents (2.4 MB); building the
prose corpus parses every module (2-8 s on 2 busy cores), so it is cached on disk.

Train / validation: by document, fixed (independent of any config): a document is held out
when the hash of its id without the corpus prefix falls below VALIDATION_FRACTION
(sources.holdout_split), so a module's code and its docstrings are on the same side.
"""

import ast
import functools
import hashlib
import json
import os
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

from sparse_llama.data import sources
from sparse_llama.ground.cache import cache_dir

CORPUS_VERSION = 1  # bump when the recipe below changes: it keys the tokenizer cache
VALIDATION_FRACTION = 0.03
NAMES = ("code", "prose")
_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test",
                            "pydoc_data", "__pycache__"})
_MIN_DOCSTRING_CHARS = 40  # one-liners like "Return x." add little English
# Characters of each corpus's train split used to train the default BPE: a few seconds of
# training on 2 cores; prose is all of it, code a deterministic (hash-ordered) subsample.
_TOKENIZER_TRAINING_CHARS = {"code": 4_000_000, "prose": 4_000_000}


def build_key(*parts) -> str:
    """A short hash of the corpus recipe, the Python build it reads, and `parts`."""
    blob = json.dumps([CORPUS_VERSION, sys.version, stdlib_root(), *parts])
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def stdlib_root() -> str:
    """The standard library's directory (sysconfig's 'stdlib' path)."""
    return sysconfig.get_paths()["stdlib"]


def _stdlib_files(suffixes: tuple[str, ...]) -> list[tuple[str, Path]]:
    """(relative posix path, path) of stdlib files with these suffixes, sorted."""
    root = Path(stdlib_root())
    found = []
    for dirpath, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _EXCLUDED_DIRS and not d.startswith("."))
        for name in sorted(names):
            if name.endswith(suffixes):
                path = Path(dirpath) / name
                found.append((path.relative_to(root).as_posix(), path))
    return sorted(found)


def _read_utf8(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


@functools.cache
def _python_sources() -> tuple[tuple[str, str], ...]:
    """(relative path, source) of every readable, non-empty stdlib .py file."""
    out = []
    for rel, path in _stdlib_files((".py",)):
        text = _read_utf8(path)
        if text and text.strip():
            out.append((rel, text))
    return tuple(out)


def _docstrings(source: str) -> str:
    """A module's docstrings (module, classes, functions), in source order."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= _MIN_DOCSTRING_CHARS:
                found.append((getattr(node, "lineno", 0), doc))
    return "\n\n".join(doc for _, doc in sorted(found, key=lambda x: x[0]))


@functools.cache
def code_documents() -> sources.DocumentList:
    """The stdlib's .py files, one document each."""
    pairs = _python_sources()
    return sources.DocumentList(f"<embedded code corpus: {stdlib_root()}>",
                                [text for _, text in pairs], [f"stdlib/{rel}" for rel, _ in pairs])


@functools.cache
def prose_documents() -> sources.DocumentList:
    """pydoc topics, module docstrings and the stdlib's text files, sorted by id.

    Parsing every module takes seconds, so the result is cached as JSON in cache_dir(),
    written atomically (a temporary file renamed into place).
    """
    file = cache_dir() / f"corpus-prose-{build_key()}.json"
    try:
        docs = json.loads(file.read_text(encoding="utf-8"))
        if not isinstance(docs, dict):
            raise ValueError(f"{file} is not a JSON object")
    except (OSError, ValueError):
        docs = _build_prose()
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=file.parent,
                                             prefix=f".{file.name}.", delete=False) as f:
                json.dump(docs, f)
            os.chmod(f.name, 0o644)  # mkstemp's 0600 would hide a shared cache from others
            os.replace(f.name, file)
        except OSError:
            pass  # a read-only cache only costs the rebuild next time
    ids = sorted(docs)
    return sources.DocumentList("<embedded prose corpus: pydoc_data.topics and stdlib docs>",
                                [docs[i] for i in ids], ids)


def _build_prose() -> dict[str, str]:
    from pydoc_data.topics import topics  # the reference manual, as pydoc's help() shows it

    docs = {f"pydoc_topics/{name}": text for name, text in topics.items() if text.strip()}
    for rel, source in _python_sources():
        text = _docstrings(source)
        if text:
            docs[f"docstrings/{rel}"] = text
    for rel, path in _stdlib_files((".txt", ".rst")):
        text = _read_utf8(path)
        if text and text.strip() and "Grammar" not in rel:  # lib2to3 grammars are not prose
            docs[f"stdlib_text/{rel}"] = text
    return docs


_CORPORA = {"code": code_documents, "prose": prose_documents}


def documents(name: str) -> sources.DocumentList:
    """All documents of the embedded corpus `name` ("code" or "prose")."""
    if name not in _CORPORA:
        raise ValueError(f"unknown embedded corpus {name!r}; known: {sorted(_CORPORA)}")
    docs = _CORPORA[name]()
    if not len(docs):
        raise ValueError(f"no documents found in {docs.path}: this Python has no readable "
                         "stdlib sources")
    return docs


def _module_of(doc_id: str) -> str:
    """"stdlib/a/b.py" and "docstrings/a/b.py" -> "a/b.py": a module's code and docstrings
    land on the same side of the split, so validation code never repeats training prose."""
    return doc_id.split("/", 1)[1]


@functools.cache
def split(name: str) -> tuple[sources.Subset, sources.Subset]:
    """(train, validation) of the embedded corpus `name`, disjoint by document."""
    return sources.holdout_split(documents(name), VALIDATION_FRACTION, group=_module_of)


def train_documents_in_hash_order(name: str) -> Iterator[str]:
    """The documents of corpus `name`'s training split in document-id hash order: a budget
    cut then takes a spread of modules, not only the first ones by path."""
    train, _ = split(name)
    order = sorted(range(len(train)), key=lambda i: sources.unit_hash(train.doc_id(i)))
    return (train[i] for i in order)


def take_chars(docs: Iterator[str], chars: int) -> list[str]:
    """Whole documents from `docs` until at least `chars` characters are taken (or `docs`
    ends)."""
    out, n = [], 0
    while n < chars:  # test before drawing: the next slice starts with the next document
        doc = next(docs, None)
        if doc is None:
            break
        out.append(doc)
        n += len(doc)
    return out


def tokenizer_training_texts() -> list[str]:
    """Deterministic subsample of both train splits that the default BPE is trained on."""
    texts = []
    for name in NAMES:
        texts.extend(take_chars(train_documents_in_hash_order(name),
                                _TOKENIZER_TRAINING_CHARS[name]))
    return texts
