"""Windows of `seq_len` cut from a token stream of framed documents, by index.

A document with tokens a1..an is framed as

    x       = [BOS] a1 .. an EOS          (BOS only when asked for and the tokenizer has one)
    inputs  = x[:-1]                      [BOS] a1 .. an
    targets = x[1:]                                 a1 .. an EOS

so every input predicts the next token of its own document: the last token predicts EOS
(generation learns to stop), and no position predicts the first token of the next document
from the previous one (targets never cross a document boundary, by construction). A source's
documents are framed and concatenated once (data/tokens.py); the pipeline then trains on a
selection of `Pieces`: runs of consecutive (input, target) pairs of one document each, whole
documents or a part of one (a held-out tail). The pairs of all pieces, in order, form one
stream, and window k is pairs [k * seq_len, (k + 1) * seq_len) of it: non-overlapping, so an
epoch trains every target exactly once, and random access (no reading of earlier windows).
Each window is a row of

    inputs, targets  (t,) int32   zeros on padding
    segment_ids      (t,) int32   1..k for the k pieces in the window, 0 = padding
    positions        (t,) int32   0, 1, 2, ... restarting at every piece (a piece continued
                                  from the previous window restarts too: it cannot see its
                                  first part anyway)
    loss_mask        (t,) float32 1 where the target is trained, 0 on padding

Only the last window of a selection can be padded. Example (seq_len 4, BOS 1, EOS 2,
documents [5 6 7] and [8]):  x = 1 5 6 7 2 | 1 8 2

    row 0: inputs 1 5 6 7  targets 5 6 7 2  segment_ids 1 1 1 1  positions 0 1 2 3
    row 1: inputs 1 8 0 0  targets 8 2 0 0  segment_ids 1 1 0 0  positions 0 1 0 0

A plain text file is one document, so its windows are plain stream windows: one segment,
positions 0..t-1, BOS only in the first window.
"""

import dataclasses
from collections.abc import Sequence

import numpy as np

ROW_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


def frame_document(ids: Sequence[int], *, eos_id: int, bos_id: int | None = None
                   ) -> np.ndarray:
    """x = [BOS] ids EOS as int64 (n + 1 + (bos_id is not None),)."""
    x = np.empty(len(ids) + 1 + (bos_id is not None), np.int64)
    start = 0
    if bos_id is not None:
        x[0] = bos_id
        start = 1
    x[start:-1] = ids
    x[-1] = eos_id
    return x


def document_example(ids: Sequence[int], *, eos_id: int,
                     bos_id: int | None = None) -> dict[str, np.ndarray]:
    """{"inputs", "targets"}: int32 (n,) each, n = len(ids) + (bos_id is not None)."""
    x = frame_document(ids, eos_id=eos_id, bos_id=bos_id).astype(np.int32)
    return {"inputs": x[:-1], "targets": x[1:]}


def empty_row(seq_len: int) -> dict[str, np.ndarray]:
    """An all-padding row (every loss_mask 0)."""
    row = {k: np.zeros(seq_len, np.int32) for k in ROW_KEYS[:-1]}
    row["loss_mask"] = np.zeros(seq_len, np.float32)
    return row


@dataclasses.dataclass(frozen=True)
class Pieces:
    """Runs of (input, target) pairs in a token array: run i trains
    tokens[starts[i] + j] -> tokens[starts[i] + j + 1] for j < lengths[i]."""

    starts: np.ndarray  # (r,) int64
    lengths: np.ndarray  # (r,) int64, all positive

    @property
    def total(self) -> int:
        """Number of (input, target) pairs."""
        return int(self.lengths.sum())


def document_pieces(bounds: np.ndarray, documents: np.ndarray | None = None) -> Pieces:
    """The pieces of whole documents (all, or those at the indices `documents`, in that
    order) of a stream whose document d is tokens[bounds[d]:bounds[d + 1]]. A framed
    document of m tokens has m - 1 pairs; documents with none are dropped."""
    bounds = np.asarray(bounds, np.int64)
    starts, ends = bounds[:-1], bounds[1:]
    if documents is not None:
        starts, ends = starts[documents], ends[documents]
    lengths = ends - starts - 1
    keep = lengths > 0
    return Pieces(starts[keep], lengths[keep])


def tail_split(pieces: Pieces, fraction: float) -> tuple[Pieces, Pieces]:
    """(head, tail) of the pair stream: the tail holds its last round(fraction * total) pairs
    (at least one when fraction > 0, never all of them), cut inside a piece if need be."""
    total = pieces.total
    held = min(max(round(fraction * total), 1 if fraction > 0 else 0), max(total - 1, 0))
    begins = np.cumsum(pieces.lengths) - pieces.lengths
    head_lengths = np.clip(total - held - begins, 0, pieces.lengths)
    tail_lengths = pieces.lengths - head_lengths
    head, tail = head_lengths > 0, tail_lengths > 0
    return (Pieces(pieces.starts[head], head_lengths[head]),
            Pieces((pieces.starts + head_lengths)[tail], tail_lengths[tail]))


class Windows:
    """The rows of `pieces` of `tokens`, `seq_len` pairs each (see the module docstring).

    A random-access grain data source: `len(w)` windows, `w[k]` the k-th row. Reading a
    window gathers its seq_len + 1 tokens from `tokens` (a memory map is fine) and costs a
    binary search over the pieces.
    """

    def __init__(self, tokens: np.ndarray, pieces: Pieces, seq_len: int):
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self._tokens, self._seq_len = tokens, seq_len
        self._starts = np.asarray(pieces.starts, np.int64)
        self._lengths = np.asarray(pieces.lengths, np.int64)
        self._ends = np.cumsum(self._lengths)  # pair index just after each piece
        self._total = int(self._ends[-1]) if len(self._ends) else 0
        self._arange = np.arange(seq_len, dtype=np.int64)

    @property
    def pairs(self) -> int:
        """Number of (input, target) pairs over all windows (the trained tokens)."""
        return self._total

    def __len__(self) -> int:
        return -(-self._total // self._seq_len)

    def __getitem__(self, k: int) -> dict[str, np.ndarray]:
        k = int(k)
        if not 0 <= k < len(self):
            raise IndexError(f"window {k} of {len(self)}")
        first = k * self._seq_len
        n = min(self._seq_len, self._total - first)
        pair = first + self._arange[:n]
        piece = np.searchsorted(self._ends, pair, side="right")
        piece_begin = self._ends[piece] - self._lengths[piece]
        src = self._starts[piece] + (pair - piece_begin)
        row = empty_row(self._seq_len)
        row["inputs"][:n] = self._tokens[src]
        row["targets"][:n] = self._tokens[src + 1]
        row["segment_ids"][:n] = piece - piece[0] + 1
        row["positions"][:n] = pair - np.maximum(piece_begin, first)
        row["loss_mask"][:n] = 1.0
        return row


def pack(token_lists: Sequence[Sequence[int]], seq_len: int, *, eos_id: int,
         bos_id: int | None = None) -> list[dict[str, np.ndarray]]:
    """All rows of tokenized documents, in order (the last one padded): for small data."""
    framed = [frame_document(ids, eos_id=eos_id, bos_id=bos_id) for ids in token_lists]
    bounds = np.zeros(len(framed) + 1, np.int64)
    np.cumsum([len(x) for x in framed], out=bounds[1:])
    tokens = np.concatenate(framed) if framed else np.zeros(0, np.int64)
    windows = Windows(tokens, document_pieces(bounds), seq_len)
    return [windows[k] for k in range(len(windows))]
