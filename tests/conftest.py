"""Test-wide setup: 8 fake CPU devices, offline Hugging Face, absl flags, shape checks.

Environment variables must be set before jax is imported anywhere, hence at module top.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from absl import flags  # noqa: E402
from jaxtyping import install_import_hook  # noqa: E402

# Every public jaxtyping annotation in the library is checked at call time in the tests.
install_import_hook("sparse_llama", "beartype.beartype")

if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
