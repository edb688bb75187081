"""The Llama block's pieces as small pure functions over explicit weight arrays.

Dimension letters: b batch, t query positions, s key positions, d model width, f MLP width,
h query heads, k kv heads, g query heads per kv head, e head dim, v vocab.
Weights are stored (in, out) and every matmul with one goes through `linear.linear` (a dense
array or a structured weight type; Hugging Face stores (out, in); see hf_io).

`mlp` takes an optional index array of kept intermediate channels and `attention_context`
an optional index array of kept query heads or of kept KV groups, so that sparsity-accelerated training (SAT) can
run forward and backward over a subset of units with plain gathers and smaller dense matmuls.

Every attention implementation (`ATTENTION`) takes (q, k, v, mask, kv_head_of_q); `mask` is a
dense boolean (b, t, s) array (any mask: a KV cache, a soft prompt) or the `SelfAttentionMask`
of a packed batch (llama.rope_and_mask), which also carries the segment ids that the splash
kernel needs instead of a dense mask.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jaxtyping import Array, Bool, Float, Int

from sparse_llama.model import sharding
from sparse_llama.model.linear import StructuredWeight, cast, linear

_NEG_INF = -1e30  # finite, so fully-masked rows (padding) give uniform weights, never NaN


def rms_norm(x: Float[Array, "*b d"], scale: Float[Array, " d"], eps: float) -> Float[Array, "*b d"]:
    """Hugging Face LlamaRMSNorm: normalise in float32, cast back, then scale."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale.astype(x.dtype) * normed.astype(x.dtype)


def rope_cos_sin(positions: Int[Array, "b t"], inv_freq: Float[Array, " half"]
                 ) -> tuple[Float[Array, "b t e"], Float[Array, "b t e"]]:
    """cos/sin tables in the rotate-half layout (frequencies repeated twice along e)."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq.astype(jnp.float32)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: Float[Array, "b t n e"], cos: Float[Array, "b t e"], sin: Float[Array, "b t e"]
               ) -> Float[Array, "b t n e"]:
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


def attention_mask(q_positions: Int[Array, "b t"], k_positions: Int[Array, "b s"],
                   q_segments: Int[Array, "b t"] | None = None,
                   k_segments: Int[Array, "b s"] | None = None) -> Bool[Array, "b t s"]:
    """Causal by position; with segment ids, tokens attend only within their own segment.

    Segment id 0 marks padding: padded keys are never attended to.
    """
    mask = k_positions[:, None, :] <= q_positions[:, :, None]
    if q_segments is not None and k_segments is not None:
        mask &= q_segments[:, :, None] == k_segments[:, None, :]
        mask &= k_segments[:, None, :] != 0
    return mask


class SelfAttentionMask(NamedTuple):
    """Causal self-attention over a (packed) batch: the dense mask and what it was made of.

    `dense` is `attention_mask(idx, idx, segment_ids, segment_ids)` (causal by index, within a
    segment, segment 0 never attended); `segment_ids` is None for one document per row.
    """

    dense: Bool[Array, "b t t"]
    segment_ids: Int[Array, "b t"] | None


Mask = Bool[Array, "b t s"] | SelfAttentionMask


def dense_mask(mask: Mask) -> Bool[Array, "b t s"]:
    return mask.dense if isinstance(mask, SelfAttentionMask) else mask


def dot_product_attention(q: Float[Array, "b t h e"], k: Float[Array, "b s k e"],
                          v: Float[Array, "b s k e"], mask: Mask,
                          kv_head_of_q: Int[Array, " h"] | None = None) -> Float[Array, "b t h e"]:
    """Softmax attention in float32 with grouped-query heads.

    Without `kv_head_of_q` query head i uses kv head i // (h / k). With it (a head subset),
    query head i uses kv head `kv_head_of_q[i]`.
    Heads are moved in front before the two matmuls (plain batched matmuls are what XLA:CPU
    runs fastest; measured ~30% faster than the einsum layout at m100 shapes).
    """
    b, t, h, e = q.shape
    mask = dense_mask(mask)
    if kv_head_of_q is not None:
        k, v = k[:, :, kv_head_of_q], v[:, :, kv_head_of_q]
    num_kv = k.shape[2]
    qh = jnp.transpose(q.reshape(b, t, num_kv, h // num_kv, e), (0, 2, 3, 1, 4))  # b k g t e
    kh = jnp.transpose(k, (0, 2, 3, 1))[:, :, None]  # b k 1 e s
    vh = jnp.transpose(v, (0, 2, 1, 3))[:, :, None]  # b k 1 s e
    scores = jnp.matmul(qh, kh, preferred_element_type=jnp.float32) * (e ** -0.5)
    scores = jnp.where(mask[:, None, None], scores, _NEG_INF)
    # The shift only guards exp against overflow; it cancels in the ratio, so no gradient.
    scores = jnp.exp(scores - jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True)))
    probs = (scores / jnp.sum(scores, axis=-1, keepdims=True)).astype(v.dtype)
    out = jnp.matmul(probs, vh)  # b k g t e
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, h, e)


def jax_attention(q: Float[Array, "b t h e"], k: Float[Array, "b s k e"],
                  v: Float[Array, "b s k e"], mask: Mask,
                  kv_head_of_q: Int[Array, " h"] | None = None) -> Float[Array, "b t h e"]:
    """`dot_product_attention` through `jax.nn.dot_product_attention` (the same mask, GQA by
    its head groups); its implementation is JAX's choice (cuDNN flash on a GPU that supports
    the inputs, XLA otherwise). Rows with no key (padding) may differ: they are never
    counted."""
    if kv_head_of_q is not None:
        k, v = k[:, :, kv_head_of_q], v[:, :, kv_head_of_q]
    out = jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype),
                                       mask=dense_mask(mask)[:, None])
    return out.astype(v.dtype)


# Tile sizes splash may use, largest first; its kernels need multiples of 128 (TPU lanes).
SPLASH_BLOCKS = (512, 256, 128)


def splash_block_sizes(seq_len: int) -> splash.BlockSizes:
    """One tile for every splash kernel (forward, dq, dkv): the largest of `SPLASH_BLOCKS`
    that divides the sequence; a sequence that none divides is refused."""
    block = next((size for size in SPLASH_BLOCKS if seq_len % size == 0), None)
    if block is None:
        raise ValueError(f"model.attention=splash needs a sequence length that is a multiple of "
                         f"{SPLASH_BLOCKS[-1]} (the kernel's smallest tile), got {seq_len}; set "
                         f"data.seq_len (calibration.seq_len when pruning) to a multiple of "
                         f"{SPLASH_BLOCKS[-1]}, or use model.attention=xla")
    return splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                             block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                             block_q_dq=block, block_kv_dq=block)


def splash_attention(q: Float[Array, "b t h e"], k: Float[Array, "b t k e"],
                     v: Float[Array, "b t k e"], mask: Mask,
                     kv_head_of_q: Int[Array, " h"] | None = None, *,
                     interpret: bool = False) -> Float[Array, "b t h e"]:
    """`dot_product_attention` through JAX's Pallas TPU splash-attention kernels (forward and
    backward): a causal mask object and the segment ids of `mask` (a `SelfAttentionMask`)
    instead of a dense mask, grouped-query heads by the kernel's own head groups.

    Padding (segment 0) attends to earlier padding instead of to nothing, so padded rows
    differ from `dot_product_attention`'s; real tokens never see them, as there.
    `interpret=True` runs the kernels in Pallas' interpreter (any backend; tests on CPU).
    Refused at trace time: a dense mask (KV cache, soft prompt), a sequence that is not a
    multiple of 128, float16.
    """
    if not isinstance(mask, SelfAttentionMask):
        raise ValueError("model.attention=splash takes only the causal self-attention mask of "
                         "a batch (llama.rope_and_mask: segment ids); this call passed a dense "
                         "mask (a soft prompt's or one over a KV cache): use model.attention=xla "
                         "or jax for it")
    _, t, h, e = q.shape
    if q.dtype == jnp.float16:
        raise ValueError("model.attention=splash does not take float16 (TPUs have no float16 "
                         "matmul); set model.dtype=bfloat16 or float32")
    block_sizes = splash_block_sizes(t)
    if kv_head_of_q is not None:  # a head subset: each query head gets its own kv head
        k, v = k[:, :, kv_head_of_q], v[:, :, kv_head_of_q]
    kernel = splash.make_splash_mha(splash.MultiHeadMask([splash.CausalMask((t, t))] * h),
                                    block_sizes=block_sizes, head_shards=1, q_seq_shards=1,
                                    interpret=interpret)
    # The kernel does not scale the scores: fold 1/sqrt(e) into q (in float32, one rounding).
    q = (q.astype(jnp.float32) * e ** -0.5).astype(q.dtype)
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))  # b n t e: the kernel's layout
    seg = None if mask.segment_ids is None else mask.segment_ids.astype(jnp.int32)

    def one_row(q1, k1, v1, seg1):  # the kernel takes one row: (n, t, e), segments (t,)
        return kernel(q1, k1, v1, segment_ids=None if seg1 is None else
                      splash.SegmentIds(seg1, seg1))

    def rows(q, k, v, seg):
        return jax.vmap(one_row)(q, k, v, seg)

    # Inside a sharded step each device runs the kernel on its own rows (a Pallas call is
    # opaque to XLA's partitioner, which would otherwise gather the batch onto every device).
    return jnp.swapaxes(sharding.map_rows(rows, q, k, v, seg), 1, 2)


ATTENTION = {"xla": dot_product_attention, "jax": jax_attention, "splash": splash_attention}


def head_columns(head_idx: Int[Array, " n"], head_dim: int) -> Int[Array, " ne"]:
    """Column indices of the projection outputs that belong to the given heads."""
    return (head_idx[:, None] * head_dim + jnp.arange(head_dim)[None, :]).reshape(-1)


def attention_context(p: dict, x: Float[Array, "b t d"], cos: Float[Array, "b t e"],
                      sin: Float[Array, "b t e"], mask: Mask, *, num_heads: int,
                      num_kv_heads: int, head_dim: int, dtype,
                      head_idx: Int[Array, " n"] | None = None,
                      group_idx: Int[Array, " m"] | None = None,
                      kv: Callable[[Array, Array], tuple[Array, Array]] | None = None,
                      attention: str = "xla",
                      ) -> tuple[Float[Array, "b t c"], Float[Array, "c d"] | StructuredWeight,
                                 tuple[Array, Array]]:
    """Attention up to (not including) the output projection.

    Returns the concatenated head outputs (the o_proj input), the o_proj weight restricted to
    the computed heads, and this step's full (k, v).
    `kv`, when given, maps the new (k, v) to the full key/value arrays to attend over (the KV
    cache update in llama.forward_cached).
    `head_idx` restricts the computation to those query heads (q and o projections gathered).
    `group_idx` (instead of head_idx) restricts it to whole KV groups: those k/v heads and all
    their query heads, so k and v are computed only for the kept groups (SAT under GQA). With
    `kv` (a cache) use neither: the cache holds every kv head. `attention` names the
    implementation (`ATTENTION`; LlamaConfig.attention); `mask` is a dense (b, t, s) mask or
    the batch's `SelfAttentionMask` (llama.rope_and_mask), passed to it as is.
    """
    b, t, _ = x.shape
    # Gather first, then cast: a bf16 step over f32 master weights casts only what it uses.
    wq, wo, wk, wv = (p[n] for n in ("q_proj", "o_proj", "k_proj", "v_proj"))
    n_q, n_kv = num_heads, num_kv_heads
    kv_head_of_q = None
    if group_idx is not None:
        group = num_heads // num_kv_heads
        head_idx = (group_idx[:, None] * group + jnp.arange(group)[None, :]).reshape(-1)
        kv_cols = head_columns(group_idx, head_dim)
        wk, wv = wk[:, kv_cols], wv[:, kv_cols]
        n_kv = group_idx.shape[0]
    if head_idx is not None:
        cols = head_columns(head_idx, head_dim)
        wq, wo = wq[:, cols], wo[cols, :]
        n_q = head_idx.shape[0]
        if group_idx is None:
            kv_head_of_q = head_idx // (num_heads // num_kv_heads)
    wq, wo, wk, wv = (cast(w, dtype) for w in (wq, wo, wk, wv))
    q = linear(x, wq).reshape(b, t, n_q, head_dim)
    k = linear(x, wk).reshape(b, t, n_kv, head_dim)
    v = linear(x, wv).reshape(b, t, n_kv, head_dim)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k_all, v_all = kv(k, v) if kv is not None else (k, v)
    out = ATTENTION[attention](q, k_all.astype(dtype), v_all.astype(dtype), mask, kv_head_of_q)
    return out.reshape(b, t, n_q * head_dim), wo, (k_all, v_all)


def attention(p: dict, x: Float[Array, "b t d"], cos: Float[Array, "b t e"],
              sin: Float[Array, "b t e"], mask: Mask, **kwargs,
              ) -> tuple[Float[Array, "b t d"], tuple[Array, Array]]:
    """Self-attention block (without its norm): `attention_context` then o_proj."""
    context, wo, new_kv = attention_context(p, x, cos, sin, mask, **kwargs)
    return linear(context, wo), new_kv


def mlp_activations(p: dict, x: Float[Array, "b t d"], *, dtype,
                    neuron_idx: Int[Array, " n"] | None = None
                    ) -> tuple[Float[Array, "b t f"], Float[Array, "f d"] | StructuredWeight]:
    """silu(x W_gate) * (x W_up), the down_proj input, and down_proj over the kept channels."""
    w_gate, w_up, w_down = (p[n] for n in ("gate_proj", "up_proj", "down_proj"))
    if neuron_idx is not None:
        w_gate, w_up, w_down = w_gate[:, neuron_idx], w_up[:, neuron_idx], w_down[neuron_idx, :]
    # Cast after gathering: only the kept channels are converted to the compute dtype.
    w_gate, w_up, w_down = (cast(w, dtype) for w in (w_gate, w_up, w_down))
    return jax.nn.silu(linear(x, w_gate)) * linear(x, w_up), w_down


def mlp(p: dict, x: Float[Array, "b t d"], *, dtype,
        neuron_idx: Int[Array, " n"] | None = None) -> Float[Array, "b t d"]:
    """SwiGLU MLP. `neuron_idx` keeps only those intermediate channels (gate/up columns and
    down rows gathered), so the matmuls shrink to the kept width."""
    act, w_down = mlp_activations(p, x, dtype=dtype, neuron_idx=neuron_idx)
    return linear(act, w_down)
