"""SmoothQuant: move activation outliers into the weights before W8A8 (docs/quantization.md,
"SmoothQuant"; Xiao et al., arXiv 2211.10438).

For each RMSNorm and the linears that read its output (input_layernorm -> q, k, v;
post_attention_layernorm -> gate, up), per input channel j:

    s_j = max|X_j|^alpha / max_o |W_jo|^(1 - alpha)     (W stored (in, out): row j)
    norm scale_j <- scale_j / s_j,   W_j: <- s_j W_j:   for every linear of the pair

so x W is unchanged in exact arithmetic while the activations the linears see are divided by
s. A channel with no activation or no nonzero weight keeps s_j = 1. Multiplying by s_j > 0
keeps every pruned zero exactly 0.
"""

import jax.numpy as jnp
from jaxtyping import Array, Float

# (norm in a block's params, the driver's tap group of its output, the linears reading it)
PAIRS = (
    ("input_layernorm", "qkv", ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj")),
    ("post_attention_layernorm", "gate_up", ("mlp/gate_proj", "mlp/up_proj")),
)
TAPS = tuple(tap for _, tap, _ in PAIRS)


def check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"quant.smoothquant_alpha={alpha} must be in [0, 1] (0 = off; "
                         "0.5 is the paper's default, 0.85 its best for Llama-2)")


def smoothing_scales(act_absmax: Float[Array, " d"], weights: list, alpha: float
                     ) -> Float[Array, " d"]:
    """s (d,) from the inputs' max |x_j| and the (d, out) weights that read them."""
    w_max = jnp.max(jnp.stack([jnp.max(jnp.abs(w.astype(jnp.float32)), axis=1)
                               for w in weights]), axis=0)
    a = act_absmax.astype(jnp.float32)
    live = (a > 0) & (w_max > 0)
    s = jnp.power(jnp.where(live, a, 1.0), alpha) / jnp.power(jnp.where(live, w_max, 1.0),
                                                               1.0 - alpha)
    return jnp.where(live, s, 1.0)


def _get(block: dict, name: str):
    group, leaf = name.split("/")
    return block[group][leaf]


def smooth_block(block: dict, act_absmax: dict, alpha: float) -> dict:
    """One decoder block's params (unstacked) smoothed; act_absmax: tap group -> (d,)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in block.items()}
    for norm, tap, names in PAIRS:
        s = smoothing_scales(act_absmax[tap], [_get(block, n) for n in names], alpha)
        out[norm] = (block[norm].astype(jnp.float32) / s).astype(block[norm].dtype)
        for name in names:
            group, leaf = name.split("/")
            w = block[group][leaf]
            out[group][leaf] = (w.astype(jnp.float32) * s[:, None]).astype(w.dtype)
    return out
