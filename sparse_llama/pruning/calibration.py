"""Calibration windows: `num_samples` random windows of `seq_len` tokens
(`docs/algorithms.md`, "Calibration and the sequential driver").

Sources: a `.npy` array of token ids (num_samples, seq_len), used exactly as given (to
reproduce another tool's calibration set); a text file, tokenized once; or, by default, the
training split of the embedded corpus (prose and code documents in a seeded order).

A text shorter than `num_samples * seq_len` tokens is refused: its windows would overlap so much
that the statistics rest on a fraction of the tokens they claim (a 100-token text gave 8
windows of 64). `allow_overlap=True` (`calibration.allow_overlap`) accepts it knowingly.
"""

import os

import numpy as np
from absl import logging

from sparse_llama.data import corpus
from sparse_llama.data.tokenizer import Tokenizer


def windows_from_npy(path: str, vocab_size: int) -> np.ndarray:
    try:
        windows = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"calibration.path={path!r} is not a readable .npy array: {err}") from err
    if windows.ndim != 2 or not np.issubdtype(windows.dtype, np.integer):
        raise ValueError(f"calibration.path={path!r} holds a {windows.dtype} array of shape "
                         f"{windows.shape}; expected integer token ids (num_samples, seq_len)")
    if windows.size == 0 or windows.min() < 0 or windows.max() >= vocab_size:
        raise ValueError(f"calibration.path={path!r} has token ids outside [0, {vocab_size}) "
                         "(the model's vocabulary) or is empty; was it made with this tokenizer?")
    return windows.astype(np.int32)


def sample_windows(stream: np.ndarray, num_samples: int, seq_len: int, seed: int, *,
                   allow_overlap: bool = False) -> np.ndarray:
    """`num_samples` windows at uniformly random offsets of a 1-D token stream (seeded).

    Raises ValueError when the stream has fewer than `num_samples * seq_len` tokens, unless
    `allow_overlap` (then it only needs one window's worth).
    """
    if num_samples < 1 or seq_len < 2:
        raise ValueError(f"calibration needs num_samples >= 1 and seq_len >= 2, got "
                         f"{num_samples} and {seq_len}")
    if stream.shape[0] < seq_len:
        raise ValueError(f"too few calibration tokens: {stream.shape[0]} tokens cannot fill one "
                         f"window of seq_len={seq_len}; give more text or lower "
                         "calibration.seq_len")
    need = num_samples * seq_len
    if need > stream.shape[0]:
        if not allow_overlap:
            raise ValueError(
                f"too few calibration tokens: the text has {stream.shape[0]} tokens but "
                f"calibration.num_samples x calibration.seq_len = {num_samples} x {seq_len} = "
                f"{need}, so the windows would overlap heavily; give a longer text, lower "
                "calibration.num_samples or calibration.seq_len, or set "
                "calibration.allow_overlap=True to accept overlapping windows")
        logging.warning("calibration: %d windows of %d tokens drawn from only %d tokens "
                        "(calibration.allow_overlap=True): the windows overlap",
                        num_samples, seq_len, stream.shape[0])
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, stream.shape[0] - seq_len + 1, size=num_samples)
    return np.stack([stream[s:s + seq_len] for s in starts]).astype(np.int32)


def corpus_stream(tokenizer: Tokenizer, num_tokens: int, seed: int) -> np.ndarray:
    """At least `num_tokens` tokens (when the corpus has them) of embedded training documents,
    EOS-separated, in a seeded order mixing prose and code."""
    docs = [train[i] for name in ("prose", "code") for train in [corpus.split(name)[0]]
            for i in range(len(train))]
    order = np.random.default_rng(seed).permutation(len(docs))
    pieces, total = [], 0
    for i in order:
        # Documents framed as the training pipeline frames them: [BOS] text [EOS].
        bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
        ids = bos + tokenizer.encode(docs[i]) + [tokenizer.eos_id]
        pieces.append(np.asarray(ids, np.int32))
        total += len(ids)
        if total >= num_tokens:
            break
    return np.concatenate(pieces)


def calibration_windows(path: str, tokenizer: Tokenizer | None, *, num_samples: int,
                        seq_len: int, seed: int, vocab_size: int,
                        allow_overlap: bool = False) -> np.ndarray:
    """The calibration windows the `calibration` config section describes.

    A `.npy` is used exactly as given (its rows may overlap: that is the caller's choice).
    """
    if path and path.endswith(".npy"):
        return windows_from_npy(path, vocab_size)
    if tokenizer is None:
        raise ValueError("calibration from text needs the model's tokenizer; this checkpoint "
                         "has no tokenizer.json (give calibration.path=FILE.npy of token ids)")
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"calibration.path={path!r} is not a file")
        with open(path, encoding="utf-8") as f:
            stream = np.asarray(tokenizer.encode(f.read()), np.int32)
    else:
        # 4x the tokens the windows need, so that random windows rarely overlap.
        stream = corpus_stream(tokenizer, 4 * num_samples * seq_len, seed)
    windows = sample_windows(stream, num_samples, seq_len, seed, allow_overlap=allow_overlap)
    if windows.max() >= vocab_size:
        raise ValueError(f"the tokenizer emits id {windows.max()} but the model's vocabulary has "
                         f"{vocab_size} entries; the tokenizer does not belong to this model")
    return windows
