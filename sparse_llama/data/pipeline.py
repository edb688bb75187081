"""The grain input pipeline: sources -> token streams -> windows -> shuffle -> mix -> shard.

Per source of the mixture:

    tokens.tokenized(source)              its documents framed [BOS] text EOS and concatenated,
                                          tokenized once and cached on disk (data/tokens.py)
    packing.Windows(train pieces)         non-overlapping seq_len windows of the training part,
                                          read by index (packing.py defines the rows)
    MapDataset.source(windows)
      .shuffle(seed_s).repeat()           a full permutation of all windows, a new one per epoch

What a document is: a plain text file is ONE document (a token stream: BOS at its start, EOS at
its end, attention across its paragraphs), a folder of text files a document per file; blank-
line paragraphs only with text_split="blank_lines". JSONL lines, Parquet rows and the embedded
corpus's files are documents: segment ids keep attention inside each and positions restart.

Chat / instruction data: a JSONL source whose first record is `{"prompt", "response"}` or
`{"messages": [...]}` is a chat source (data/chat.py): its conversations are rendered with the
chat template of `tokenizer_dir` (the train_iterator / eval_batches argument; the plain
template without one, or with data.chat_template="plain"), tokenized in memory, and read as
`chat.ChatWindows`: the same rows, with loss_mask 1 only where the target is an assistant
token. Conversations are documents for packing and for the held-out split.

Then all sources: `MapDataset.mix(parts, weights)` interleaves windows deterministically in
proportion to the normalised weights (every window holds seq_len trained tokens, so weights
are shares of training TOKENS); process p of P takes mixed windows p, p + P, p + 2P, ...
(disjoint, covering; so global batch g is mixed windows [g * B, (g + 1) * B) for any P), and
batches them by B / P; an optional background thread prefetches batches.

Validation: data.eval_path if set (its windows, all of them, and training uses all of every
source); else the embedded corpus's fixed split (corpus.py); else, for a source of several
documents, the documents whose id hash falls below data.validation_fraction (by document, so a
document is never on both sides); and for a source of one document (a single text file) the
last validation_fraction of its tokens: a contiguous tail, so no validation window overlaps
or neighbours training text, as a wikitext-style test split. That tail is never trained on: a
loop that trains on the whole file (the tail included) and is measured on the tail, or on
any other part of the file, is not measured on held-out text (docs/recipes.md,
"configs/sparse.py"); give data.eval_path to train on all of the file.

Batches are dicts of numpy arrays (b = rows, t = seq_len):
    inputs, targets, segment_ids, positions  (b, t) int32
    loss_mask                                (b, t) float32
The iterator is a `grain.DatasetIterator`; `get_state()` is a small JSON dict (the next batch
index and the data layout it indexes) and `set_state(state)` on a freshly built iterator (same
config, tokenizer, seed and process layout) continues with exactly the next batch, at once:
windows are read by index, nothing is replayed. A state of another data layout (the data or
seq_len changed) is refused.

Config keys: see `data()` in configs/blocks.py.
"""

import dataclasses
import hashlib
import heapq
import itertools
import os
from collections.abc import Iterator, Mapping

import grain
import numpy as np

from sparse_llama.data import chat, corpus, sources, tokens
from sparse_llama.data.packing import Pieces, document_pieces, empty_row, tail_split
from sparse_llama.data.tokenizer import Tokenizer

DEFAULT_KINDS = {"default_code": "code", "default_prose": "prose"}
KINDS = (*sources.READERS, *DEFAULT_KINDS)
DEFAULT_MIXTURE = {"text": {"kind": "default_prose", "weight": 0.7},
                   "code": {"kind": "default_code", "weight": 0.3}}
_SOURCE_KEYS = {"kind", "path", "weight", "text_field", "text_split"}
_REMOVED_KEYS = {
    "shuffle_buffer": "training windows are now shuffled globally (a full permutation of "
                      "every source's windows per epoch); delete the key (data.shuffle=False "
                      "reads windows in stream order)",
}


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """One named source of the mixture; `weight` is normalised (the weights sum to 1)."""

    name: str
    kind: str
    path: str
    weight: float
    text_field: str
    text_split: str


def _as_dict(entry) -> dict:
    return entry.to_dict() if hasattr(entry, "to_dict") else dict(entry)


def check_data_config(data_cfg) -> None:
    """Raise ValueError naming the key and the fix for a data section the pipeline cannot use
    (the per-source checks are in `mixture`)."""
    for key, why in _REMOVED_KEYS.items():
        if key in data_cfg:
            raise ValueError(f"data.{key} is no longer a setting: {why}")
    split = data_cfg.get("text_split", "auto")
    if split not in sources.TEXT_SPLITS:
        raise ValueError(f"data.text_split must be one of {sources.TEXT_SPLITS}, got {split!r}")
    fraction = data_cfg.get("validation_fraction", 0.03)
    if not (isinstance(fraction, int | float) and 0 <= fraction < 1):
        raise ValueError(f"data.validation_fraction must be in [0, 1), got {fraction!r}")
    shuffle = data_cfg.get("shuffle", True)
    if not isinstance(shuffle, bool):
        raise ValueError(f"data.shuffle must be True or False, got {shuffle!r}")


def mixture(data_cfg) -> list[SourceSpec]:
    """The sources the config trains on, validated: `path` if set, else `sources`, else the
    embedded mixture (prose 0.7 / code 0.3). Sorted by name."""
    check_data_config(data_cfg)
    field, split = data_cfg.get("text_field", "text"), data_cfg.get("text_split", "auto")
    if data_cfg.get("path"):
        entries = {"path": {"path": data_cfg.path, "kind": sources.infer_kind(data_cfg.path)}}
    else:
        entries = {name: _as_dict(e) for name, e in (data_cfg.get("sources") or {}).items()}
        entries = entries or DEFAULT_MIXTURE
    specs = []
    for name, entry in sorted(entries.items()):
        unknown = set(entry) - _SOURCE_KEYS
        if unknown:
            raise ValueError(f"data.sources.{name}: unknown keys {sorted(unknown)}; "
                             f"allowed: {sorted(_SOURCE_KEYS)}")
        path = str(entry.get("path") or "")
        kind = entry.get("kind") or (sources.infer_kind(path) if path else "")
        if kind not in KINDS:
            raise ValueError(f"data.sources.{name}: kind must be one of {list(KINDS)}, "
                             f"got {kind!r}")
        if kind in DEFAULT_KINDS and path:
            raise ValueError(f"data.sources.{name}: kind {kind!r} is the embedded corpus and "
                             f"takes no path (got {path!r})")
        if kind not in DEFAULT_KINDS and not path:
            raise ValueError(f"data.sources.{name}: kind {kind!r} needs a path")
        weight = float(entry.get("weight", 1.0))
        if not weight > 0:
            raise ValueError(f"data.sources.{name}: weight must be positive, got {weight}")
        text_split = entry.get("text_split", split)
        if text_split not in sources.TEXT_SPLITS:
            raise ValueError(f"data.sources.{name}: text_split must be one of "
                             f"{sources.TEXT_SPLITS}, got {text_split!r}")
        specs.append(SourceSpec(name, kind, path, weight, entry.get("text_field", field),
                                text_split))
    total = sum(s.weight for s in specs)
    return [dataclasses.replace(s, weight=s.weight / total) for s in specs]


def _read(spec: SourceSpec) -> sources.Documents:
    return sources.read_documents(spec.kind, spec.path, text_field=spec.text_field,
                                  text_split=spec.text_split)


def tokenized(spec: SourceSpec, data_cfg, tokenizer: Tokenizer,
              tokenizer_dir: str | None = None) -> tokens.TokenizedSource | chat.ChatStream:
    """Every document of `spec`, tokenized and framed (cached; data/tokens.py). A JSONL of
    chat / instruction records (data/chat.py) is rendered with the chat template of
    `tokenizer_dir` (or the plain one) and keeps its assistant-only trained flags."""
    if spec.kind == "jsonl" and chat.is_chat_jsonl(spec.path):
        return chat.chat_stream(spec.path, tokenizer, tokenizer_dir,
                                chat_template=data_cfg.get("chat_template", "auto"),
                                add_bos=bool(data_cfg.get("add_bos", True)))
    options = {"add_bos": bool(data_cfg.get("add_bos", True)),
               "num_threads": int(data_cfg.get("num_threads", 1)),
               "cache_dir": data_cfg.get("token_cache") or None}
    if spec.kind in DEFAULT_KINDS:
        name = DEFAULT_KINDS[spec.kind]
        return tokens.tokenized(["embedded", name, corpus.build_key()],
                                lambda: corpus.documents(name), tokenizer, **options)
    path = os.path.abspath(os.path.expanduser(spec.path))
    how = spec.text_field if spec.kind != "text" else spec.text_split.replace("auto", "file")
    key = ["file", spec.kind, path, how, sources.fingerprint(path)]
    return tokens.tokenized(key, lambda: _read(spec), tokenizer, **options)


def source_pieces(spec: SourceSpec, data_cfg, tokenizer: Tokenizer,
                  tokenizer_dir: str | None = None
                  ) -> tuple[tokens.TokenizedSource | chat.ChatStream, Pieces, Pieces | None]:
    """(the source's tokens, its training pieces, its validation pieces or None when
    data.eval_path replaces them); the split rules are in the module docstring."""
    stream = tokenized(spec, data_cfg, tokenizer, tokenizer_dir)
    bounds = stream.bounds
    if spec.kind in DEFAULT_KINDS:
        train_docs, validation_docs = corpus.split(DEFAULT_KINDS[spec.kind])
        train = document_pieces(bounds, train_docs.indices)
        validation = document_pieces(bounds, validation_docs.indices)
    elif data_cfg.get("eval_path"):
        train, validation = document_pieces(bounds), None
    else:
        fraction = float(data_cfg.get("validation_fraction", 0.03))
        if stream.num_documents == 1:
            train, validation = tail_split(document_pieces(bounds), fraction)
        else:
            held = sources.holdout_mask(stream.id_hash, fraction, spec.path)
            train = document_pieces(bounds, np.flatnonzero(~held))
            validation = document_pieces(bounds, np.flatnonzero(held))
    if not train.total:
        raise ValueError(f"data.sources.{spec.name}: {spec.path or spec.kind} has no training "
                         "tokens (its documents are empty or all held out for validation)")
    return stream, train, validation


def _seed(seed: int, name: str) -> int:
    """A 31-bit seed for `name`, so sources shuffle independently of each other. 31 bits:
    grain's shuffle uses seed + epoch, which must stay below 2**32."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:4], "little") % 2**31


class DataIterator(grain.DatasetIterator):
    """The pipeline's iterator: batches of the parent, with the data layout in its state."""

    def __init__(self, parent: grain.DatasetIterator, layout: dict):
        super().__init__(parent)
        self._layout = layout

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._parent)

    def get_state(self) -> dict:
        return {"batches": self._parent.get_state(), "layout": self._layout}

    def set_state(self, state: dict) -> None:
        layout = state.get("layout") if isinstance(state, dict) else None
        if layout != self._layout:
            raise ValueError(
                f"the data-iterator state to restore indexes another data layout ({layout}) "
                f"than this run's ({self._layout}): the data, data.seq_len or the data "
                "shards changed since it was saved (or it predates the windowed pipeline); "
                "resume with the same data, or train into a new workdir")
        self._parent.set_state(state["batches"])


def train_iterator(data_cfg, tokenizer: Tokenizer, *, seq_len: int, global_batch_size: int,
                   seed: int, process_index: int | None = None,
                   process_count: int | None = None,
                   tokenizer_dir: str | None = None) -> DataIterator:
    """This process's share of every global batch, forever, with exact get/set_state.

    process_index / process_count default to jax.process_index() / jax.process_count().
    Yields {"inputs", "targets", "segment_ids", "positions": (b, t) int32,
    "loss_mask": (b, t) float32} with b = global_batch_size // process_count, t = seq_len.
    """
    if process_index is None or process_count is None:
        import jax  # late: the pipeline itself does not need jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple "
                         f"of the process count {process_count}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    specs = mixture(data_cfg)
    parts, windows = [], {}
    for spec in specs:
        stream, train, _ = source_pieces(spec, data_cfg, tokenizer, tokenizer_dir)
        source = chat.windows(stream, train, seq_len)
        windows[spec.name] = len(source)
        ds = grain.MapDataset.source(source)
        if data_cfg.get("shuffle", True):
            ds = ds.shuffle(seed=_seed(seed, spec.name))
        parts.append(ds.repeat())
    ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, [s.weight for s in specs])
    ds = ds[process_index::process_count].batch(global_batch_size // process_count,
                                                drop_remainder=True)
    # Reading a batch is a few numpy gathers: no reader threads, one prefetch thread at most.
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    prefetch = int(data_cfg.get("prefetch_batches", 2))
    if prefetch > 0:
        it_ds = grain.experimental.ThreadPrefetchIterDataset(it_ds, prefetch_buffer_size=prefetch)
    layout = {"seq_len": seq_len, "windows": windows, "shard": [process_index, process_count],
              "shuffle": bool(data_cfg.get("shuffle", True))}
    return DataIterator(it_ds.__iter__(), layout)


def _interleave(streams: Mapping[str, Iterator[dict]],
                weights: Mapping[str, float]) -> Iterator[dict]:
    """Rows of all streams, row k of stream s at (k + 1/2) / weight_s: proportional while
    every stream has rows, then the rest (ties by name)."""
    def keyed(name: str, stream: Iterator[dict]):
        for k, row in enumerate(stream):
            yield (k + 0.5) / weights[name], name, row

    merged = heapq.merge(*(keyed(n, s) for n, s in sorted(streams.items())),
                         key=lambda x: x[:2])
    for *_, row in merged:
        yield row


def eval_batches(data_cfg, tokenizer: Tokenizer, *, seq_len: int, batch_size: int,
                 max_batches: int | None = None,
                 tokenizer_dir: str | None = None) -> list[dict[str, np.ndarray]]:
    """Deterministic validation batches (same keys and dtypes as training, (batch_size, t)).

    The windows are data.eval_path's if set, else the held-out part of every source, in
    stream order, with sources' windows interleaved in proportion to their weights. The last
    batch is completed with all-padding rows (loss_mask 0). Every process gets the same.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    check_data_config(data_cfg)
    if data_cfg.get("eval_path"):
        spec = SourceSpec("eval", sources.infer_kind(data_cfg.eval_path),
                          str(data_cfg.eval_path), 1.0, data_cfg.get("text_field", "text"),
                          data_cfg.get("text_split", "auto"))
        stream = tokenized(spec, data_cfg, tokenizer, tokenizer_dir)
        windows = {"eval": chat.windows(stream, document_pieces(stream.bounds), seq_len)}
        weights = {"eval": 1.0}
    else:
        specs = mixture(data_cfg)
        windows = {}
        for spec in specs:
            stream, _, validation = source_pieces(spec, data_cfg, tokenizer, tokenizer_dir)
            windows[spec.name] = chat.windows(stream, validation, seq_len)
        weights = {s.name: s.weight for s in specs}
    streams = {name: (w[k] for k in range(len(w))) for name, w in windows.items() if len(w)}
    if not streams:
        raise ValueError("no validation data: set data.eval_path or a positive "
                         "data.validation_fraction")
    rows = _interleave(streams, weights)
    batches = []
    while max_batches is None or len(batches) < max_batches:
        chunk = list(itertools.islice(rows, batch_size))
        if not chunk:
            break
        chunk += [empty_row(seq_len)] * (batch_size - len(chunk))
        batches.append({k: np.stack([r[k] for r in chunk]) for k in chunk[0]})
    return batches
