"""Attention implementations (LlamaConfig.attention) agree with the default one: values and
gradients, grouped-query heads, packed documents with padding.

"splash" is a Pallas TPU kernel: here it runs in Pallas' interpreter on CPU (the `interpreted`
fixture), and its TPU lowering is checked with `jax.export`; it never runs natively here.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from configs import blocks
from sparse_llama import loading
from sparse_llama.model import layers, llama
from sparse_llama.model.config import preset
from sparse_llama.model.loss import lm_loss

CFG = preset("tiny").replace(vocab_size=96, max_position_embeddings=512)  # 4 heads, 2 KV


@pytest.fixture
def interpreted(monkeypatch):
    """attention="splash" through the Pallas interpreter (CPU) for this test."""
    monkeypatch.setitem(layers.ATTENTION, "splash",
                        functools.partial(layers.splash_attention, interpret=True))


def packed_batch(length: int = 32):
    """Two rows: three documents, then two and a padded tail (segment 0, no loss).

    Document lengths scale with `length` (a multiple of 32); at 384 splash runs 3 x 3 tiles of
    128 and every document boundary falls inside a tile."""
    rng = np.random.default_rng(0)
    n = length // 32
    seg = np.array([[1] * 10 * n + [2] * 12 * n + [3] * 10 * n,
                    [1] * 14 * n + [2] * 11 * n + [0] * 7 * n], np.int32)
    pos = np.zeros_like(seg)
    for r in range(2):
        for s in set(seg[r]) - {0}:
            idx = np.flatnonzero(seg[r] == s)
            pos[r, idx] = np.arange(len(idx))
    tokens = rng.integers(0, CFG.vocab_size, seg.shape).astype(np.int32)
    return {"inputs": jnp.asarray(tokens), "targets": jnp.asarray(np.roll(tokens, -1, 1)),
            "positions": jnp.asarray(pos), "segment_ids": jnp.asarray(seg),
            "loss_mask": jnp.asarray((seg > 0).astype(np.float32))}


@pytest.mark.parametrize("impl,length", [("jax", 32), ("splash", 384)])
def test_implementation_matches_xla_in_values_and_gradients(impl, length, interpreted):
    params = llama.init_params(jax.random.key(0), CFG, init_std=0.2)
    batch = packed_batch(length)
    ref_cfg, cfg = CFG, CFG.replace(attention=impl)

    def loss(p, c):
        total, count = lm_loss(p, batch, c)
        return total / count

    @functools.partial(jax.jit, static_argnums=1)
    def forward(p, c):
        return llama.forward(p, batch["inputs"], c, positions=batch["positions"],
                             segment_ids=batch["segment_ids"])

    ref_logits, logits = forward(params, ref_cfg), forward(params, cfg)
    real = np.asarray(batch["segment_ids"]) > 0  # padded rows attend to nothing: not compared
    np.testing.assert_allclose(np.asarray(logits)[real], np.asarray(ref_logits)[real],
                               rtol=1e-5, atol=1e-5)
    value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    (l_ref, g_ref), (l_new, g_new) = (value_and_grad(params, c) for c in (ref_cfg, cfg))
    np.testing.assert_allclose(float(l_new), float(l_ref), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_new), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-6)


def test_splash_matches_xla_on_a_head_subset_without_segments():
    """SAT's query-head subsets (`kv_head_of_q`: k/v gathered per query head) and rows
    without segment ids (causal only), values and VJP, in one 128-token tile."""
    b, t, e = 2, 128, 16
    kv_head_of_q = jnp.asarray([0, 1, 1], jnp.int32)
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.normal(size=s), jnp.float32)
               for s in ((b, t, 3, e), (b, t, 2, e), (b, t, 2, e)))
    idx = jnp.broadcast_to(jnp.arange(t), (b, t))
    mask = layers.SelfAttentionMask(layers.attention_mask(idx, idx), None)
    probe = jnp.asarray(rng.normal(size=q.shape), jnp.float32)

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v, mask, kv_head_of_q) * probe)

    splash = functools.partial(layers.splash_attention, interpret=True)
    ref, new = (jax.jit(jax.value_and_grad(functools.partial(loss, fn), argnums=(0, 1, 2)))(
        q, k, v) for fn in (layers.dot_product_attention, splash))
    for a, r in zip(jax.tree.leaves(new), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-4, atol=1e-5)


def test_splash_in_a_sharded_step_runs_each_devices_rows():
    """Under a step's `activation_rows` layout (4 devices over the batch) the kernel runs per
    device on its own row (shard_map): the values equal xla's and the program holds the
    per-device (manual) region; without it XLA would gather the batch for the kernel."""
    from jax.sharding import NamedSharding, PartitionSpec

    from sparse_llama.model import sharding

    b, t, e = 4, 128, 16
    rng = np.random.default_rng(2)
    q, k, v = (jnp.asarray(rng.normal(size=s), jnp.float32)
               for s in ((b, t, 4, e), (b, t, 2, e), (b, t, 2, e)))
    seg = jnp.asarray(np.repeat([[1, 2]], b, 0).repeat(t // 2, 1), jnp.int32)
    idx = jnp.broadcast_to(jnp.arange(t), (b, t))
    mask = layers.SelfAttentionMask(layers.attention_mask(idx, idx, seg, seg), seg)
    mesh = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4])
    rows = NamedSharding(mesh, PartitionSpec("data"))

    def run(q, k, v, seg, layout=rows):
        m = layers.SelfAttentionMask(mask.dense, seg)
        with sharding.activation_rows(layout):
            return layers.splash_attention(q, k, v, m, interpret=True)

    shards = [jax.device_put(x, rows) for x in (q, k, v, seg)]
    out = jax.jit(run)(*shards)
    np.testing.assert_allclose(np.asarray(out), np.asarray(layers.dot_product_attention(
        q, k, v, mask)), rtol=1e-4, atol=1e-5)
    assert out.sharding.is_equivalent_to(rows, 4)
    assert "manual" in jax.jit(run).lower(*shards).as_text()  # the kernel runs per device
    plain = jax.jit(functools.partial(run, layout=None)).lower(q, k, v, seg).as_text()
    assert "manual" not in plain  # what the check tells apart


def test_kv_cache_decoding_with_splash_runs_xla_attention():
    params = llama.init_params(jax.random.key(0), CFG, init_std=0.2)
    tokens = packed_batch()["inputs"][:, :5]
    logits = {}
    for impl in ("xla", "splash"):
        cfg = CFG.replace(attention=impl)
        logits[impl], _ = llama.forward_cached(params, tokens, cfg, llama.init_cache(cfg, 2, 16),
                                               jnp.int32(0))
    np.testing.assert_array_equal(logits["splash"], logits["xla"])


def test_splash_refuses_what_the_kernel_cannot_take_at_trace_time():
    params = jax.eval_shape(lambda: llama.init_params(jax.random.key(0), CFG))
    splash = CFG.replace(attention="splash")

    def trace(cfg, t):
        tokens = jax.ShapeDtypeStruct((2, t), jnp.int32)
        return jax.eval_shape(lambda p, x: llama.forward(p, x, cfg), params, tokens)

    with pytest.raises(ValueError, match=r"multiple of 128 .* got 200; set data.seq_len"):
        trace(splash, 200)
    with pytest.raises(ValueError, match=r"does not take float16 .*; set model.dtype=bfloat16"):
        trace(splash.replace(dtype="float16"), 128)
    x = jnp.zeros((1, 128, 4, 16))
    dense = jnp.ones((1, 128, 128), bool)
    with pytest.raises(ValueError, match="passed a dense mask"):
        layers.splash_attention(x, x[:, :, :2], x[:, :, :2], dense)


def test_splash_is_refused_off_tpu_before_loading():
    model_cfg = blocks.model()
    model_cfg.attention = "splash"
    with pytest.raises(ValueError, match="model.attention=splash runs on TPU only .* cpu"):
        loading.check_model_section(model_cfg)
    model_cfg.attention = "flash"
    with pytest.raises(ValueError, match="model.attention='flash' is not one of"):
        loading.check_model_section(model_cfg)


def test_splash_forward_and_backward_lower_for_tpu():
    """Pallas lowers the splash kernels to Mosaic custom calls at Llama's head_dim 128 in
    bfloat16, scanned layers; Mosaic's own compiler runs only on a TPU (not checked here)."""
    cfg = CFG.replace(attention="splash", head_dim=128, dtype="bfloat16", scan_layers=True)
    params = jax.eval_shape(lambda: llama.init_params(jax.random.key(0), cfg))
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in packed_batch(256).items()}

    def grads(p, batch):
        return jax.grad(lambda p: lm_loss(p, batch, cfg)[0])(p)

    exported = export.export(jax.jit(grads), platforms=["tpu"])(params, batch)
    text = exported.mlir_module()
    # forward (with residuals), dq and dkv kernels, each once in the scanned block
    assert text.count("tpu_custom_call") == 3
    for kernel in ("splash_mha_fwd_segmented_residuals", "splash_mha_dq_segmented",
                   "splash_mha_dkv_segmented"):
        assert kernel in text


def test_an_unknown_implementation_is_refused():
    with pytest.raises(ValueError, match="attention must be one of"):
        CFG.replace(attention="flash")
