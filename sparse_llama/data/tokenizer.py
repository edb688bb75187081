"""Tokenizers: a small frozen wrapper around `tokenizers.Tokenizer`, loading, BPE training.

The wrapper never adds special tokens in `encode`: the data pipeline places BOS/EOS itself
(sparse_llama/data/packing.py). A saved tokenizer is a Hugging Face tokenizer directory
(`tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json`) that
`transformers.AutoTokenizer.from_pretrained(dir)` loads; its post-processor adds BOS for
Hugging Face users, like Llama's tokenizers do.

`default_tokenizer(vocab_size)` is a byte-level BPE trained once on the TRAIN split of the
embedded corpus (sparse_llama/data/corpus.py) and cached under `$SPARSE_LLAMA_CACHE` (default
`~/.cache/sparse_llama`).
"""

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from sparse_llama.data import corpus
from sparse_llama.ground.cache import cache_dir

BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"
# Names tried, in order, when a tokenizer.json comes with no metadata naming its specials.
_BOS_GUESSES = (BOS, "<|begin_of_text|>", "<bos>")
_EOS_GUESSES = (EOS, "<|end_of_text|>", "<|endoftext|>", "<eos>")


@dataclasses.dataclass(frozen=True, eq=False)
class Tokenizer:
    """A `tokenizers.Tokenizer` with its BOS/EOS ids. Immutable; safe to share across threads.

    eos_id: appended after every document by the packer (required).
    bos_id: prepended to every document when not None.
    pad_id: only recorded for export; padding in batches uses segment id 0, not a token.
    """

    backend: tokenizers.Tokenizer
    eos_id: int
    bos_id: int | None = None
    pad_id: int | None = None

    @functools.cached_property
    def vocab_size(self) -> int:
        """Number of embedding rows needed: 1 + the largest id (added tokens included)."""
        return 1 + max(self.backend.get_vocab(with_added_tokens=True).values())

    @functools.cached_property
    def fingerprint(self) -> str:
        """A hash of the full tokenizer definition and its specials (for cache keys)."""
        blob = self.backend.to_str() + json.dumps([self.bos_id, self.eos_id, self.pad_id])
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no special tokens added."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` over many texts (parallel in Rust unless TOKENIZERS_PARALLELISM=false)."""
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = False) -> str:
        """Text of `ids` (a list or a 1-D integer array)."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.backend.id_to_token(token_id)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write a Hugging Face tokenizer directory; returns its path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        specials = {f"{name}_token": self.token(i) for name, i in
                    (("bos", self.bos_id), ("eos", self.eos_id), ("pad", self.pad_id))
                    if i is not None}
        unk = self.backend.token_to_id(UNK)
        if unk is not None:
            specials["unk_token"] = UNK
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000_000,
            **specials,
        }
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (directory / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
        return directory


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int) -> None:
    """Raise ValueError when the tokenizer can emit ids outside the model's embedding."""
    if tokenizer.vocab_size > model_vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} ids but the model's embedding has only "
            f"{model_vocab_size} rows: use a model with vocab_size >= {tokenizer.vocab_size} "
            "or a smaller tokenizer (data.tokenizer_vocab_size / data.tokenizer_path)")


def _special_name(value) -> str | None:
    """A special token as written in tokenizer_config.json: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _first_id(value) -> int | None:
    """An id from config.json: an int, or a list of ints (Llama 3 lists several EOS ids)."""
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    return data if isinstance(data, dict) else {}


def _find_special(backend: tokenizers.Tokenizer, directory: Path, kind: str,
                  guesses: Sequence[str]) -> int | None:
    """The id of the `kind` ("bos" / "eos" / "pad") token from the files next to tokenizer.json."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        token = _special_name(_read_json(directory / name).get(f"{kind}_token"))
        if token is not None and backend.token_to_id(token) is not None:
            return backend.token_to_id(token)
    for name in ("config.json", "generation_config.json"):
        token_id = _first_id(_read_json(directory / name).get(f"{kind}_token_id"))
        if token_id is not None:
            return token_id
    for token in guesses:
        if backend.token_to_id(token) is not None:
            return backend.token_to_id(token)
    return None


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a `tokenizer.json` file, or a directory holding one (e.g. a Hugging Face model).

    BOS/EOS come from tokenizer_config.json, special_tokens_map.json, config.json or
    generation_config.json in the same directory, in that order, else from common token names
    (`<s>`/`</s>`, `<|begin_of_text|>`/`<|end_of_text|>`, `<|endoftext|>`). BOS may be absent;
    EOS is required (the packer separates documents with it).
    """
    path = Path(path).expanduser()
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        extra = ""
        if path.is_dir() and (path / "tokenizer.model").is_file():
            extra = (" (only a sentencepiece tokenizer.model is there: convert it with "
                     "transformers' AutoTokenizer(...).save_pretrained(dir) first)")
        raise ValueError(f"no tokenizer found at {path}: expected a tokenizer.json file or a "
                         f"directory containing one{extra}")
    try:
        backend = tokenizers.Tokenizer.from_file(str(file))
    except Exception as e:  # the Rust side raises plain Exception subclasses
        raise ValueError(f"cannot load tokenizer {file}: {e}") from e
    directory = file.parent
    eos_id = _find_special(backend, directory, "eos", _EOS_GUESSES)
    if eos_id is None:
        raise ValueError(
            f"cannot tell the EOS token of {file}: no eos_token in tokenizer_config.json or "
            f"special_tokens_map.json, no eos_token_id in config.json, and none of "
            f"{list(_EOS_GUESSES)} is in the vocabulary")
    bos_id = _find_special(backend, directory, "bos", _BOS_GUESSES)
    pad_id = _find_special(backend, directory, "pad", (PAD,))
    return Tokenizer(backend=backend, eos_id=eos_id, bos_id=bos_id, pad_id=pad_id)


def train_bpe(texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style pre-tokenisation) with specials <s> </s> <unk> <pad>.

    Ids 0..3 are the specials, then the 256 byte symbols, then merges. Byte-level means every
    string is encodable and `decode(encode(s)) == s`. The result may have fewer than
    `vocab_size` ids when the texts do not support that many merges.
    """
    specials = [BOS, EOS, UNK, PAD]
    if vocab_size < 256 + len(specials):
        raise ValueError(f"vocab_size must be >= {256 + len(specials)} for a byte-level BPE, "
                         f"got {vocab_size}")
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(texts, trainer)
    bos_id, eos_id = backend.token_to_id(BOS), backend.token_to_id(EOS)
    # Only Hugging Face users see this (our `encode` passes add_special_tokens=False): BOS first,
    # as Llama tokenizers do, and as our packer lays out every document.
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1", special_tokens=[(BOS, bos_id)])
    return Tokenizer(backend=backend, eos_id=eos_id, bos_id=bos_id,
                     pad_id=backend.token_to_id(PAD))


def _write_atomically(final: Path, write) -> None:
    """Run `write(tmp_dir)` then rename tmp_dir to `final`: readers never see a partial dir."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{uuid.uuid4().hex[:8]}.",
                                dir=final.parent))
    try:
        write(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide a shared cache from others
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process finished first (the target exists and is not empty): keep theirs.
            if not (final / "tokenizer.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def default_tokenizer(vocab_size: int = 4096) -> Tokenizer:
    """The embedded byte-level BPE: trained on the embedded corpus's train split, then cached.

    The cache key covers the corpus recipe, the Python build (whose files are the corpus), the
    tokenizers version and `vocab_size`. Training reads a deterministic subsample
    (corpus.tokenizer_training_texts) and takes a few seconds.
    """
    key = corpus.build_key(tokenizers.__version__, vocab_size)
    final = cache_dir() / f"tokenizer-bpe{vocab_size}-{key}"
    if not (final / "tokenizer.json").is_file():
        trained = train_bpe(corpus.tokenizer_training_texts(), vocab_size)
        _write_atomically(final, trained.save)
    return load_tokenizer(final)
