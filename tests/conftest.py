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

import pytest  # noqa: E402
from absl import flags  # noqa: E402
from jaxtyping import install_import_hook  # noqa: E402

# Every public jaxtyping annotation in the library is checked at call time in the tests.
install_import_hook("sparse_llama", "beartype.beartype")

if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


@pytest.fixture(scope="session")
def finetune_dirs(tmp_path_factory):
    """(dense teacher dir, its 70%-pruned student dir, a chat JSONL, a plain-text file) of
    the tiny preset, for the fine-tuning runs (distillation, LoRA, soft prompts)."""
    import json

    import jax
    import numpy as np

    from sparse_llama.data.tokenizer import default_tokenizer
    from sparse_llama.model import hf_io, llama
    from sparse_llama.model.config import preset
    from sparse_llama.sparse_io.sparse_export import save_sparse_hf
    from sparse_llama.sparsity.static import static_masks

    cfg = preset("tiny")
    root = tmp_path_factory.mktemp("finetune")
    tokenizer = default_tokenizer(cfg.vocab_size)
    tok_dir = str(tokenizer.save(root / "tokenizer"))
    params = jax.device_get(llama.init_params(jax.random.key(0), cfg))
    teacher = hf_io.save_hf(params, cfg, root / "teacher", tokenizer_dir=tok_dir)
    masks = jax.device_get(static_masks(params, "magnitude", 0.7, jax.random.key(1)))
    pruned = jax.tree.map(lambda w, m: np.where(m, w, 0).astype(w.dtype), params, masks)
    student, _ = save_sparse_hf(pruned, cfg, root / "student", masks=masks,
                                tokenizer_dir=tok_dir)
    chat = root / "chat.jsonl"
    chat.write_text("".join(json.dumps({"prompt": f"add {i} and {i}", "response": str(2 * i)})
                            + "\n" for i in range(200)))
    text = root / "text.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 400)
    return str(teacher), str(student), str(chat), str(text)
