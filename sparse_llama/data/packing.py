"""Packing tokenized documents into fixed-length rows (concatenate, then split).

A document with tokens a1..an becomes the example

    x       = [BOS] a1 .. an EOS          (BOS only when the tokenizer has one)
    inputs  = x[:-1]                      [BOS] a1 .. an
    targets = x[1:]                                 a1 .. an EOS

so every input predicts the next token of its own document: the last token predicts EOS
(generation learns to stop), and no position predicts the first token of the next document
from the previous one (targets never cross a document boundary, by construction). Examples are
concatenated and cut into rows of `seq_len`; a document that does not fit continues at the
start of the next row. Each row carries

    inputs, targets  (t,) int32   zeros on padding
    segment_ids      (t,) int32   1..k for the k document pieces in the row, 0 = padding
    positions        (t,) int32   0, 1, 2, ... restarting at every piece (a continued document
                                  restarts too: it cannot see its first part anyway)
    loss_mask        (t,) float32 1 where the target is trained, 0 on padding

Padding only appears in the last row of a finite stream. Example (seq_len 4, BOS 1, EOS 2,
documents [5 6 7] and [8]):  x = 1 5 6 7 2 | 1 8 2

    row 0: inputs 1 5 6 7  targets 5 6 7 2  segment_ids 1 1 1 1  positions 0 1 2 3
    row 1: inputs 1 8 0 0  targets 8 2 0 0  segment_ids 1 1 0 0  positions 0 1 0 0

The packer is a grain transformation whose state is (the parent's state before the document
being cut, the offset into it): JSON-serialisable, and restoring it re-reads one document.
(grain 0.2.18's ConcatThenSplitIterDataset keeps tuples in its state, which a JSON round trip
turns into lists that its `set_state` misreads, and it restores by replaying elements.)
"""

from collections.abc import Iterable, Sequence
from typing import Any

import grain
import numpy as np

ROW_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


def document_example(ids: Sequence[int], *, eos_id: int,
                     bos_id: int | None = None) -> dict[str, np.ndarray]:
    """{"inputs", "targets"}: int32 (n,) each, n = len(ids) + (bos_id is not None)."""
    x = np.empty(len(ids) + 1 + (bos_id is not None), np.int32)
    start = 0
    if bos_id is not None:
        x[0] = bos_id
        start = 1
    x[start:-1] = ids
    x[-1] = eos_id
    return {"inputs": x[:-1], "targets": x[1:]}


def empty_row(seq_len: int) -> dict[str, np.ndarray]:
    """An all-padding row (every loss_mask 0)."""
    row = {k: np.zeros(seq_len, np.int32) for k in ROW_KEYS[:-1]}
    row["loss_mask"] = np.zeros(seq_len, np.float32)
    return row


class _PackIterator(grain.DatasetIterator):
    """Emits rows of `seq_len` cut from the concatenation of the parent's examples."""

    def __init__(self, parent: grain.DatasetIterator, seq_len: int):
        super().__init__(parent)
        self._seq_len = seq_len
        self._arange = np.arange(seq_len, dtype=np.int32)
        self._doc: dict[str, np.ndarray] | None = None  # the example being cut
        self._doc_parent_state: Any = None  # the parent's state just before `_doc`
        self._offset = 0  # tokens of `_doc` already emitted
        self._exhausted = False

    def _next_doc(self) -> bool:
        """Load the next non-empty example; False when the parent is exhausted."""
        while not self._exhausted:
            state = self._parent.get_state()
            try:
                doc = next(self._parent)
            except StopIteration:
                self._exhausted = True
                break
            if len(doc["inputs"]):
                self._doc, self._doc_parent_state, self._offset = doc, state, 0
                return True
        return False

    def __next__(self) -> dict[str, np.ndarray]:
        t = self._seq_len
        row = empty_row(t)
        filled, segment = 0, 0
        while filled < t:
            if self._doc is None and not self._next_doc():
                break
            doc_len = len(self._doc["inputs"])
            n = min(doc_len - self._offset, t - filled)
            piece = slice(self._offset, self._offset + n)
            out = slice(filled, filled + n)
            row["inputs"][out] = self._doc["inputs"][piece]
            row["targets"][out] = self._doc["targets"][piece]
            segment += 1
            row["segment_ids"][out] = segment
            row["positions"][out] = self._arange[:n]
            row["loss_mask"][out] = 1.0
            filled += n
            self._offset += n
            if self._offset == doc_len:
                self._doc = None
        if filled == 0:
            raise StopIteration
        return row

    def get_state(self) -> dict[str, Any]:
        if self._doc is None:
            return {"parent": self._parent.get_state(), "offset": 0}
        return {"parent": self._doc_parent_state, "offset": self._offset}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._doc, self._offset, self._exhausted = None, 0, False
        if state["offset"]:
            if not self._next_doc():
                raise ValueError(f"cannot restore packing state {state}: the parent has no "
                                 "document there (was the data changed?)")
            self._offset = int(state["offset"])


class PackIterDataset(grain.IterDataset):
    """Rows of `seq_len` (see the module docstring) from a dataset of `document_example`s."""

    def __init__(self, parent: grain.IterDataset, seq_len: int):
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        super().__init__(parent)
        self._seq_len = seq_len

    def __iter__(self) -> _PackIterator:
        return _PackIterator(self._parent.__iter__(), self._seq_len)

    def __str__(self) -> str:
        return f"PackIterDataset(seq_len={self._seq_len})"


def pack(token_lists: Iterable[Sequence[int]], seq_len: int, *, eos_id: int,
         bos_id: int | None = None) -> list[dict[str, np.ndarray]]:
    """All rows from tokenized documents, in order (the last one padded): for small data."""
    examples = [document_example(ids, eos_id=eos_id, bos_id=bos_id) for ids in token_lists]
    return list(PackIterDataset(grain.MapDataset.source(examples).to_iter_dataset(), seq_len))
