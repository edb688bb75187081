"""Masked next-token cross-entropy, always reduced in float32.

The loss returns the *sum* of per-token negative log-likelihoods and the number of counted
tokens, not their ratio: gradient accumulation, data parallelism and evaluation all add sums
and counts over pieces and divide once, so every piece is weighted by its tokens, exactly as
if the whole batch had been one.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from sparse_llama.model import llama
from sparse_llama.model.config import LlamaConfig

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


def token_nll(logits: Float[Array, "b t v"], targets: Int[Array, "b t"]) -> Float[Array, "b t"]:
    """-log softmax(logits)[target] per position, in float32."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return log_z - picked


def lm_loss(params: dict, batch: dict, config: LlamaConfig, masks=None
            ) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """(sum of masked token NLLs, number of counted tokens) of one batch.

    `batch` holds `inputs`, `targets` (inputs shifted by one), `segment_ids`, `positions`
    (int32, (b, t)) and `loss_mask` (float32, (b, t); 0 for padding and document ends).
    """
    logits = llama.forward(params, batch["inputs"], config, masks,
                           positions=batch["positions"], segment_ids=batch["segment_ids"])
    weights = batch["loss_mask"].astype(jnp.float32)
    nll = token_nll(logits, batch["targets"])
    # where, not multiply: a masked position with an inf logit must not turn the sum into NaN.
    return jnp.sum(jnp.where(weights > 0, nll * weights, 0.0)), jnp.sum(weights)
