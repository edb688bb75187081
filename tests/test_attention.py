"""Attention implementations (LlamaConfig.attention) agree with the default one: values and
gradients, grouped-query heads, packed documents with padding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_llama.model import llama
from sparse_llama.model.config import preset
from sparse_llama.train.loss import lm_loss

CFG = preset("tiny").replace(vocab_size=96, max_position_embeddings=64)  # 4 heads, 2 KV


def packed_batch():
    """Two rows: three documents, then two and a padded tail (segment 0, no loss)."""
    rng = np.random.default_rng(0)
    seg = np.array([[1] * 10 + [2] * 12 + [3] * 10, [1] * 14 + [2] * 11 + [0] * 7], np.int32)
    pos = np.zeros_like(seg)
    for r in range(2):
        for s in set(seg[r]) - {0}:
            idx = np.flatnonzero(seg[r] == s)
            pos[r, idx] = np.arange(len(idx))
    tokens = rng.integers(0, CFG.vocab_size, seg.shape).astype(np.int32)
    return {"inputs": jnp.asarray(tokens), "targets": jnp.asarray(np.roll(tokens, -1, 1)),
            "positions": jnp.asarray(pos), "segment_ids": jnp.asarray(seg),
            "loss_mask": jnp.asarray((seg > 0).astype(np.float32))}


@pytest.mark.parametrize("impl", ["jax"])
def test_implementation_matches_xla_in_values_and_gradients(impl):
    params = llama.init_params(jax.random.key(0), CFG, init_std=0.2)
    batch = packed_batch()
    ref_cfg, cfg = CFG, CFG.replace(attention=impl)

    def loss(p, c):
        total, count = lm_loss(p, batch, c)
        return total / count

    ref_logits = llama.forward(params, batch["inputs"], ref_cfg,
                               positions=batch["positions"], segment_ids=batch["segment_ids"])
    logits = llama.forward(params, batch["inputs"], cfg, positions=batch["positions"],
                           segment_ids=batch["segment_ids"])
    real = np.asarray(batch["segment_ids"]) > 0  # padded rows attend to nothing: not compared
    np.testing.assert_allclose(np.asarray(logits)[real], np.asarray(ref_logits)[real],
                               rtol=1e-5, atol=1e-5)
    (l_ref, g_ref), (l_new, g_new) = (jax.value_and_grad(loss)(params, c)
                                      for c in (ref_cfg, cfg))
    np.testing.assert_allclose(float(l_new), float(l_ref), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_new), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-6)


def test_an_unknown_implementation_is_refused():
    with pytest.raises(ValueError, match="attention must be one of"):
        CFG.replace(attention="flash")
