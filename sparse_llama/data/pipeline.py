"""The grain input pipeline: mixture of sources -> tokenize -> pack -> mix -> shuffle -> batch.

Per source (its train split, this process's shard of its documents):

    MapDataset.source(docs)          documents (str), sources.Documents
      .shuffle(seed).repeat()        a new document order every epoch, forever
      .map(tokenize)                 packing.document_example, lazily, in `num_threads` threads
      .to_iter_dataset(...)
    PackIterDataset(seq_len)         rows (packing.py)

then all sources: `IterDataset.mix(rows, weights)` (grain interleaves rows deterministically in
proportion to the normalised weights, so weights are fractions of training TOKENS), a window
shuffle of `shuffle_buffer` rows (so a long file does not fill whole batches), `batch`, and an
optional background-thread prefetch. Each process reads the documents i with
i % process_count == process_index of every source (disjoint, covering) and yields its local
batch (global_batch_size // process_count rows).

Batches are dicts of numpy arrays (b = rows, t = seq_len):
    inputs, targets, segment_ids, positions  (b, t) int32
    loss_mask                                (b, t) float32
(packing.py defines their meaning). The iterator is a `grain.DatasetIterator`: `get_state()`
is a JSON-serialisable dict and `set_state(state)` on a freshly built iterator (same config,
tokenizer, seed and process layout) continues with exactly the next batch; grain's orbax
`grain.checkpoint.CheckpointHandler` saves it too.

Config keys: see `data()` in configs/blocks.py.
"""

import dataclasses
import hashlib
import heapq
import itertools
from collections.abc import Iterator, Mapping

import grain
import numpy as np

from sparse_llama.data import corpus, sources
from sparse_llama.data.packing import PackIterDataset, document_example, empty_row
from sparse_llama.data.tokenizer import Tokenizer

DEFAULT_KINDS = {"default_code": "code", "default_prose": "prose"}
KINDS = (*sources.READERS, *DEFAULT_KINDS)
DEFAULT_MIXTURE = {"text": {"kind": "default_prose", "weight": 0.7},
                   "code": {"kind": "default_code", "weight": 0.3}}
_SOURCE_KEYS = {"kind", "path", "weight", "text_field", "text_split"}


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


def mixture(data_cfg) -> list[SourceSpec]:
    """The sources the config trains on, validated: `path` if set, else `sources`, else the
    embedded mixture (prose 0.7 / code 0.3). Sorted by name."""
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


def source_splits(spec: SourceSpec,
                  data_cfg) -> tuple[sources.Documents, sources.Documents | None]:
    """(train documents, validation documents or None when data.eval_path replaces them)."""
    if spec.kind in DEFAULT_KINDS:
        train, validation = corpus.split(DEFAULT_KINDS[spec.kind])
        return train, validation
    docs = _read(spec)
    if data_cfg.get("eval_path"):
        return docs, None
    return sources.holdout_split(docs, float(data_cfg.get("validation_fraction", 0.03)))


def shard(docs: sources.Documents, process_index: int,
          process_count: int) -> sources.Subset:
    """This process's documents: those with index % process_count == process_index."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if len(docs) < process_count:
        raise ValueError(f"{docs.path} has {len(docs)} training documents, fewer than the "
                         f"{process_count} processes that each read their own share")
    return sources.Subset(docs, np.arange(process_index, len(docs), process_count))


def _seed(seed: int, name: str) -> int:
    """A 31-bit seed for `name`, so sources shuffle independently of each other. 31 bits:
    grain's window shuffle uses seed + window index, which must stay below 2**32."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:4], "little") % 2**31


def _rows(docs: sources.Documents, tokenizer: Tokenizer, seq_len: int, data_cfg, *,
          seed: int | None) -> grain.IterDataset:
    """Packed rows of `docs`: shuffled and repeated forever when `seed` is given, else once."""
    bos_id = tokenizer.bos_id if data_cfg.get("add_bos", True) else None
    eos_id = tokenizer.eos_id

    def to_example(text: str) -> dict[str, np.ndarray]:
        return document_example(tokenizer.encode(text), eos_id=eos_id, bos_id=bos_id)

    ds = grain.MapDataset.source(docs)
    if seed is not None:
        ds = ds.shuffle(seed=seed).repeat()
    threads = int(data_cfg.get("num_threads", 1))
    ds = ds.map(to_example).to_iter_dataset(grain.ReadOptions(
        num_threads=threads, prefetch_buffer_size=2 * threads))
    return PackIterDataset(ds, seq_len)


def train_dataset(data_cfg, tokenizer: Tokenizer, *, seq_len: int, local_batch_size: int,
                  seed: int, process_index: int = 0, process_count: int = 1
                  ) -> grain.IterDataset:
    """The infinite dataset of local batches (see the module docstring)."""
    specs = mixture(data_cfg)
    parts = []
    for spec in specs:
        train, _ = source_splits(spec, data_cfg)
        parts.append(_rows(shard(train, process_index, process_count), tokenizer, seq_len,
                           data_cfg, seed=_seed(seed, spec.name)))
    ds = parts[0] if len(parts) == 1 else grain.IterDataset.mix(parts, [s.weight for s in specs])
    window = int(data_cfg.get("shuffle_buffer", 128))
    if window > 1:
        ds = grain.experimental.WindowShuffleIterDataset(ds, window_size=window,
                                                         seed=_seed(seed, "rows"))
    ds = ds.batch(local_batch_size, drop_remainder=True)
    prefetch = int(data_cfg.get("prefetch_batches", 2))
    if prefetch > 0:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
    return ds


def train_iterator(data_cfg, tokenizer: Tokenizer, *, seq_len: int, global_batch_size: int,
                   seed: int, process_index: int | None = None,
                   process_count: int | None = None) -> grain.DatasetIterator:
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
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    ds = train_dataset(data_cfg, tokenizer, seq_len=seq_len,
                       local_batch_size=global_batch_size // process_count, seed=seed,
                       process_index=process_index, process_count=process_count)
    return ds.__iter__()


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
                 max_batches: int | None = None) -> list[dict[str, np.ndarray]]:
    """Deterministic validation batches (same keys and dtypes as training, (batch_size, t)).

    The documents are data.eval_path's if set, else the held-out split of every source,
    unshuffled, with sources' rows interleaved in proportion to their weights. The last batch
    is completed with all-padding rows (loss_mask 0). Every process gets the same batches.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if data_cfg.get("eval_path"):
        eval_spec = SourceSpec("eval", sources.infer_kind(data_cfg.eval_path),
                               str(data_cfg.eval_path), 1.0, data_cfg.get("text_field", "text"),
                               data_cfg.get("text_split", "auto"))
        docs = {"eval": _read(eval_spec)}
        weights = {"eval": 1.0}
    else:
        specs = mixture(data_cfg)
        docs = {s.name: source_splits(s, data_cfg)[1] for s in specs}
        weights = {s.name: s.weight for s in specs}
    streams = {name: iter(_rows(d, tokenizer, seq_len, data_cfg, seed=None))
               for name, d in docs.items() if len(d)}
    if not streams:
        raise ValueError("no validation documents: set data.eval_path or a positive "
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
