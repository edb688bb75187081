"""Where built artifacts live (the embedded corpus, tokenizers, token caches, XLA programs)."""

import os
from pathlib import Path


def cache_dir() -> Path:
    """$SPARSE_LLAMA_CACHE, else ~/.cache/sparse_llama."""
    return Path(os.environ.get("SPARSE_LLAMA_CACHE") or "~/.cache/sparse_llama").expanduser()
