"""The Llama decoder as pure functions of explicit pytrees.

Params (plain nested dict; layer tensors stacked on a leading layer axis L):

    embed_tokens                      (V, D)
    layers/input_layernorm            (L, D)
    layers/self_attn/{q,k,v,o}_proj   (L, D, H*E), (L, D, K*E), (L, D, K*E), (L, H*E, D)
    layers/post_attention_layernorm   (L, D)
    layers/mlp/{gate,up,down}_proj    (L, D, F), (L, D, F), (L, F, D)
    norm                              (D,)
    lm_head                           (D, V)   absent when tie_word_embeddings

The stacked layout is the only layout: `config.scan_layers` only chooses between a
`lax.scan` over L and an unrolled Python loop, and a per-layer view is `layer_params(p, i)`.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from sparse_llama.ground import param_table
from sparse_llama.ground.tree_paths import set_path
from sparse_llama.model import layers, sharding
from sparse_llama.model.config import LlamaConfig, rope_inverse_frequencies
from sparse_llama.model.linear import linear
from sparse_llama.sparsity.masks import apply_masks

_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def param_shapes(config: LlamaConfig) -> dict:
    """The params tree as (shape) tuples, without allocating (ground/param_table.py)."""
    size = {"v": config.vocab_size, "d": config.hidden_size, "f": config.intermediate_size,
            "q": config.q_width, "k": config.kv_width}
    shapes: dict = {}
    for p in param_table.PARAMS:
        if p.path == ("lm_head",) and config.tie_word_embeddings:
            continue
        layers = (config.num_layers,) if p.path[0] == "layers" else ()
        set_path(shapes, p.path, (*layers, *(size[c] for c in p.dims)))
    return shapes


def init_params(key: jax.Array, config: LlamaConfig, param_dtype=jnp.float32,
                init_std: float = 0.02) -> dict:
    """Normal(0, init_std) weights, ones for norms (Hugging Face's Llama init)."""
    shapes = param_shapes(config)
    flat, treedef = jax.tree_util.tree_flatten_with_path(
        shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(key, len(flat))
    leaves = []
    for (path, shape), k in zip(flat, keys, strict=True):
        if "norm" in str(path[-1]):
            leaves.append(jnp.ones(shape, param_dtype))
        else:
            leaves.append((init_std * jax.random.normal(k, shape, jnp.float32)).astype(param_dtype))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _index(tree, i: int):
    # 0-d leaves (the masks of dense tensors) have no layer axis and stand for every layer.
    return jax.tree.map(lambda w: w[i] if jnp.ndim(w) else w, tree)


def layer_params(params: dict, i: int) -> dict:
    """The i-th decoder block's weights (or masks), unstacked: a cheap slice of every leaf."""
    return _index(params["layers"], i)


def set_layer_params(params: dict, i: int, block: dict) -> dict:
    """A copy of params whose i-th block is replaced by `block`."""
    new_layers = jax.tree.map(lambda w, b: w.at[i].set(b.astype(w.dtype)) if jnp.ndim(w) else w,
                              params["layers"], block)
    return {**params, "layers": new_layers}


def output_weights(params: dict) -> Array:
    return params["lm_head"] if "lm_head" in params else params["embed_tokens"].T


def block_with_taps(p: dict, x: Float[Array, "b t d"], cos, sin, mask, config: LlamaConfig,
                    *, neuron_idx=None, head_idx=None, group_idx=None, kv=None):
    """One decoder block: pre-norm attention and pre-norm SwiGLU, each with a residual.

    Returns (output, new_kv, taps) where taps holds the input of every linear layer, keyed by
    the group of linears that read it: 'qkv' (q/k/v_proj), 'o_proj', 'gate_up' (gate/up_proj),
    'down_proj'. Callers that ignore taps pay nothing (XLA drops the unused values).
    """
    dtype = x.dtype
    # Inside a traced train step every activation is split over the batch devices
    # (sharding.activation_rows); elsewhere these are no-ops.
    x = sharding.constrain_rows(x)
    h = layers.rms_norm(x, p["input_layernorm"], config.rms_norm_eps)
    context, wo, new_kv = layers.attention_context(
        p["self_attn"], h, cos, sin, mask, num_heads=config.num_heads,
        num_kv_heads=config.num_kv_heads, head_dim=config.dim_per_head, dtype=dtype,
        head_idx=head_idx, group_idx=group_idx, kv=kv, attention=config.attention)
    x = x + linear(context, wo)
    h2 = layers.rms_norm(x, p["post_attention_layernorm"], config.rms_norm_eps)
    act, w_down = layers.mlp_activations(p["mlp"], h2, dtype=dtype, neuron_idx=neuron_idx)
    act = sharding.constrain_rows(act)
    context = sharding.constrain_rows(context)
    taps = {"qkv": h, "o_proj": context, "gate_up": h2, "down_proj": act}
    return x + linear(act, w_down), new_kv, taps


def block(p: dict, x: Float[Array, "b t d"], cos, sin, mask, config: LlamaConfig, *,
          neuron_idx=None, head_idx=None, group_idx=None, kv=None):
    """One decoder block (see block_with_taps): returns (output, new_kv)."""
    out, new_kv, _ = block_with_taps(p, x, cos, sin, mask, config, neuron_idx=neuron_idx,
                                     head_idx=head_idx, group_idx=group_idx, kv=kv)
    return out, new_kv


def run_blocks(stacked: dict, x: Array, per_layer, step_fn, config: LlamaConfig):
    """Apply `step_fn(layer_params, x, layer_xs) -> (x, layer_out)` over the layer axis.

    `per_layer` is a pytree with a leading L axis (or None), sliced for each layer; unrolled,
    it may instead be a list of L per-layer pytrees, which may differ in shape from layer to
    layer (SAT over some of the blocks). Returns the
    final x and the stacked per-layer outputs. With `config.scan_layers` this is one `lax.scan`
    (a 70B compiles one block); otherwise an unrolled loop (easier to inspect and profile).
    """
    fn = step_fn
    if config.remat != "none":
        fn = jax.checkpoint(step_fn, policy=_REMAT[config.remat])
    if config.scan_layers:
        if isinstance(per_layer, list):
            raise ValueError("per-layer inputs of different shapes need the unrolled blocks "
                             "(model.scan_layers=0)")
        return jax.lax.scan(lambda c, xs: fn(xs[0], c, xs[1]), x, (stacked, per_layer))
    outs = []
    for i in range(config.num_layers):
        if isinstance(per_layer, list):
            layer_xs = per_layer[i]
        else:
            layer_xs = None if per_layer is None else _index(per_layer, i)
        x, out = fn(_index(stacked, i), x, layer_xs)
        outs.append(out)
    return x, jax.tree.map(lambda *o: jnp.stack(o), *outs) if outs[0] is not None else None


def rope_and_mask(shape: tuple[int, int], config: LlamaConfig, positions=None,
                  segment_ids=None):
    """Rotary tables and the attention mask for a batch of this shape: a
    `layers.SelfAttentionMask`, the dense (b, t, t) mask with the segment ids it came from
    (the splash kernel takes those instead; XLA drops whichever part goes unused)."""
    b, t = shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    cos, sin = _rope(positions, config)
    # Causality is by index, not by the rotary positions (which restart in packed documents).
    idx = jnp.broadcast_to(jnp.arange(t), (b, t))
    dense = layers.attention_mask(idx, idx, segment_ids, segment_ids)
    return cos, sin, layers.SelfAttentionMask(dense, segment_ids)


def embed(params, tokens, config):
    return jnp.take(params["embed_tokens"], tokens, axis=0).astype(config.dtype)


def head_logits(params, x, config):
    """Final norm and output projection of hidden states x (b, t, d): float32 logits."""
    x = layers.rms_norm(x, params["norm"], config.rms_norm_eps)
    return jnp.dot(x, output_weights(params).astype(x.dtype), preferred_element_type=jnp.float32)


def _rope(positions, config):
    inv_freq = jnp.asarray(rope_inverse_frequencies(config), jnp.float32)
    return layers.rope_cos_sin(positions, inv_freq)


def forward(params: dict, tokens: Int[Array, "b t"], config: LlamaConfig, masks=None, *,
            positions: Int[Array, "b t"] | None = None,
            segment_ids: Int[Array, "b t"] | None = None,
            neuron_idx: Int[Array, "l n"] | list | None = None,
            head_idx: Int[Array, "l nh"] | list | None = None,
            group_idx: Int[Array, "l ng"] | list | None = None,
            return_hidden: bool = False):
    """Logits (float32, (b, t, V)) of a causal LM over `tokens`.

    masks: pytree like params (bool), applied as `w * mask` before use.
    positions: rotary positions (default 0..t-1 in every row; packed data passes per-document
      positions). segment_ids: packed documents; attention stays within a segment, 0 = padding.
    neuron_idx / head_idx / group_idx: per-layer kept MLP channels / query heads / KV groups
      (each with all its query heads; k and v are then computed only for those groups), for
      SAT. Stacked (L, n) arrays, or (unrolled blocks only) lists of L per-layer index arrays
      or None (that layer dense), so layers may keep different numbers of units.
    return_hidden: also return the decoder blocks' outputs, stacked (L, b, t, D).
    """
    if masks is not None:
        params = apply_masks(params, masks)
    cos, sin, mask = rope_and_mask(tokens.shape, config, positions, segment_ids)

    def step(p, x, xs):
        n_idx, h_idx, g_idx = xs if xs is not None else (None, None, None)
        x, _ = block(p, x, cos, sin, mask, config, neuron_idx=n_idx, head_idx=h_idx,
                     group_idx=g_idx)
        return x, (x if return_hidden else None)

    per_layer = None
    indices = (neuron_idx, head_idx, group_idx)
    if any(isinstance(i, list) for i in indices):
        per_layer = [tuple(i[layer] if isinstance(i, list) else (None if i is None else i[layer])
                           for i in indices) for layer in range(config.num_layers)]
    elif any(i is not None for i in indices):
        per_layer = indices
    x, hidden = run_blocks(params["layers"], embed(params, tokens, config), per_layer, step,
                           config)
    logits = head_logits(params, x, config)
    return (logits, hidden) if return_hidden else logits


def init_cache(config: LlamaConfig, batch: int, max_len: int, dtype=None) -> dict:
    """Empty KV cache: k and v of shape (L, b, max_len, K, E)."""
    shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.dim_per_head)
    dtype = dtype or config.dtype
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("cache",))
def forward_cached(params: dict, tokens: Int[Array, "b t"], config: LlamaConfig, cache: dict,
                   start: Int[Array, ""]) -> tuple[Float[Array, "b t v"], dict]:
    """Logits for `tokens` placed at positions start..start+t-1, attending to the cache.

    Returns the logits and the cache with this step's keys and values written in. All rows of
    the batch share the same positions (prompts of equal length).
    """
    return forward_cached_embeds(params, embed(params, tokens, config), config, cache, start)


def forward_cached_embeds(params: dict, x: Float[Array, "b t d"], config: LlamaConfig,
                          cache: dict, start: Int[Array, ""]
                          ) -> tuple[Float[Array, "b t v"], dict]:
    """`forward_cached` from input embeddings (a soft prompt's rows, model/soft_prompt.py).

    Prefill and decode steps attend over the cache with a dense mask, which the splash kernel
    does not take: with `config.attention == "splash"` they run the xla attention.
    """
    if config.attention == "splash":
        config = config.replace(attention="xla")
    b, t, _ = x.shape
    max_len = cache["k"].shape[2]
    q_pos = start + jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    k_pos = jnp.broadcast_to(jnp.arange(max_len, dtype=jnp.int32), (b, max_len))
    cos, sin = _rope(q_pos, config)
    mask = layers.attention_mask(q_pos, k_pos)

    def step(p, x, layer_cache):
        ck, cv = layer_cache

        def write(k, v):
            at = (0, start, 0, 0)
            return (jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), at),
                    jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), at))

        x, new_kv = block(p, x, cos, sin, mask, config, kv=write)
        return x, new_kv

    x, (k, v) = run_blocks(params["layers"], x.astype(config.dtype), (cache["k"], cache["v"]),
                           step, config)
    return head_logits(params, x, config), {"k": k, "v": v}


def count_params(params: dict) -> int:
    return int(sum(np.prod(w.shape) for w in jax.tree.leaves(params)))
