"""Importance scores of MLP channels and KV groups, per decoder block, from the current batch.

Units: an MLP intermediate channel j (gate/up column j, down row j) and a KV group g (k/v head
g with the G = H / K query heads that share it: their q columns, k/v columns and o rows). Under
MHA a group is one head. Every score is a float32 array, (L, F) for channels and (L, K) for
groups; larger is more important. With x the block's attention-norm output h (q/k/v input),
c the attention context (o_proj input), x2 the MLP-norm output (gate/up input) and
a = silu(x2 W_gate) * (x2 W_up) (down input), over the scored tokens n (padding excluded):

    uniform     1 for every unit (the selection is then a uniformly random subset)
    magnitude   sum of |w| over the unit's weights (no activations)
    wanda       sum over the unit's weights of |w_ij| * ||X_i||_2, X_i the input feature
                that w_ij multiplies (x2 for gate/up, a_j for down; h for q/k/v, c for o)
    maxip       channel: max_n |a_nj|, the largest activation of the channel;
                group: the sum over its query heads of max_n ||c_n,head||_2

A group's score is the sum of its heads' (and its k/v head's) parts. Scores are computed with
no gradient, from a dense forward over a subsample of the batch (`subsample`): rows at an
even stride and optionally only a prefix of positions (causal: a prefix is exact for its
tokens), so scoring costs a fraction of a forward (benchmarks/sat.py measures it).
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from sparse_llama.model import llama
from sparse_llama.model.config import LlamaConfig

METRICS = ("uniform", "magnitude", "wanda", "maxip")
NEEDS_ACTIVATIONS = ("wanda", "maxip")


def subsample(batch: dict, fraction: float, seq_len: int = 0) -> dict:
    """`round(B * fraction)` rows (at least 1) at an even stride, and the first `seq_len`
    positions of each (0: all): the tokens the scores are computed from."""
    b, t = batch["inputs"].shape
    rows = max(1, min(b, int(round(b * fraction))))
    idx = jnp.arange(rows) * (b // rows)
    length = t if not seq_len else min(seq_len, t)
    out = {}
    for key in ("inputs", "positions", "segment_ids"):
        if key in batch:
            out[key] = batch[key][idx, :length]
    return out


def _group_sum(q_cols: Float[Array, "l qe"], kv_cols: Float[Array, "l ke"],
               num_kv_heads: int) -> Float[Array, "l k"]:
    """Per-column parts -> per-group sums (a group's query heads are contiguous columns)."""
    n = q_cols.shape[0]
    return (q_cols.reshape(n, num_kv_heads, -1).sum(-1)
            + kv_cols.reshape(n, num_kv_heads, -1).sum(-1))


def magnitude(layers: dict, config: LlamaConfig
              ) -> tuple[Float[Array, "l f"], Float[Array, "l k"]]:
    """sum |w| over each channel's and each group's weights."""
    a, m = layers["self_attn"], layers["mlp"]
    ab = lambda w: jnp.abs(w.astype(jnp.float32))  # noqa: E731
    mlp = ab(m["gate_proj"]).sum(1) + ab(m["up_proj"]).sum(1) + ab(m["down_proj"]).sum(2)
    q_cols = ab(a["q_proj"]).sum(1) + ab(a["o_proj"]).sum(2)
    kv_cols = ab(a["k_proj"]).sum(1) + ab(a["v_proj"]).sum(1)
    return mlp, _group_sum(q_cols, kv_cols, config.num_kv_heads)


def activation_stats(params: dict, batch: dict, config: LlamaConfig) -> dict:
    """Per-layer input statistics of a dense forward over `batch` (float32, no gradient).

    Returns {"h_norm" (L, D), "c_norm" (L, H*E), "c_max" (L, H), "x2_norm" (L, D),
    "a_norm" (L, F), "a_max" (L, F)}: L2 norms over tokens of the q/k/v, o, gate/up and down
    inputs, the largest per-head context norm and the largest |activation| of each channel.
    """
    params = jax.lax.stop_gradient(params)
    tokens = batch["inputs"]
    segments = batch.get("segment_ids")
    cos, sin, mask = llama.rope_and_mask(tokens.shape, config, batch.get("positions"), segments)
    weight = (jnp.ones(tokens.shape, jnp.float32) if segments is None
              else (segments > 0).astype(jnp.float32))[..., None]  # b t 1
    b, t = tokens.shape

    def step(p, x, _):
        x, _, taps = llama.block_with_taps(p, x, cos, sin, mask, config)
        f32 = {k: v.astype(jnp.float32) for k, v in taps.items()}
        norm = lambda v: jnp.sqrt(jnp.sum(weight * v * v, axis=(0, 1)))  # noqa: E731
        heads = f32["o_proj"].reshape(b, t, config.num_heads, config.dim_per_head)
        head_norms = jnp.sqrt(jnp.sum(heads * heads, axis=-1)) * weight  # b t h
        stats = {"h_norm": norm(f32["qkv"]), "c_norm": norm(f32["o_proj"]),
                 "c_max": jnp.max(head_norms, axis=(0, 1)), "x2_norm": norm(f32["gate_up"]),
                 "a_norm": norm(f32["down_proj"]),
                 "a_max": jnp.max(jnp.abs(f32["down_proj"]) * weight, axis=(0, 1))}
        return x, stats

    _, stats = llama.run_blocks(params["layers"], llama.embed(params, tokens, config), None,
                                step, config)
    return jax.lax.stop_gradient(stats)


def wanda(layers: dict, stats: dict, config: LlamaConfig
          ) -> tuple[Float[Array, "l f"], Float[Array, "l k"]]:
    """sum |w_ij| * ||X_i|| over each unit's weights (see the module docstring)."""
    a, m = layers["self_attn"], layers["mlp"]
    ab = lambda w: jnp.abs(w.astype(jnp.float32))  # noqa: E731
    rows = lambda n, w: jnp.einsum("ld,ldf->lf", n, ab(w))  # noqa: E731
    mlp = (rows(stats["x2_norm"], m["gate_proj"]) + rows(stats["x2_norm"], m["up_proj"])
           + stats["a_norm"] * ab(m["down_proj"]).sum(2))
    q_cols = rows(stats["h_norm"], a["q_proj"]) + stats["c_norm"] * ab(a["o_proj"]).sum(2)
    kv_cols = rows(stats["h_norm"], a["k_proj"]) + rows(stats["h_norm"], a["v_proj"])
    return mlp, _group_sum(q_cols, kv_cols, config.num_kv_heads)


def maxip(stats: dict, config: LlamaConfig
          ) -> tuple[Float[Array, "l f"], Float[Array, "l k"]]:
    """Channel: max |activation|; group: sum over its query heads of max context norm."""
    c_max = stats["c_max"]
    return stats["a_max"], c_max.reshape(c_max.shape[0], config.num_kv_heads, -1).sum(-1)


def unit_scores(metric: str, params: dict, batch: dict, config: LlamaConfig
                ) -> tuple[Float[Array, "l f"], Float[Array, "l k"]]:
    """(channel scores (L, F), group scores (L, K)) of every layer by `metric`; `batch` is
    the already subsampled batch (ignored by uniform and magnitude)."""
    if metric not in METRICS:
        raise ValueError(f"sat.metric={metric!r} is not one of {METRICS}")
    n, f, k = config.num_layers, config.intermediate_size, config.num_kv_heads
    if metric == "uniform":
        return jnp.ones((n, f), jnp.float32), jnp.ones((n, k), jnp.float32)
    layers = jax.lax.stop_gradient(params["layers"])
    if metric == "magnitude":
        return magnitude(layers, config)
    stats = activation_stats(params, batch, config)
    if metric == "wanda":
        return wanda(layers, stats, config)
    return maxip(stats, config)


def layer_rows(scores: Float[Array, "l n"], layers: Int[Array, " m"]) -> Float[Array, "m n"]:
    """The rows of the SAT layers."""
    return scores[layers]
