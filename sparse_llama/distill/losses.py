"""Distillation losses over the loss tokens of a batch: logit KD and per-layer SquareHead.

Both follow docs/algorithms.md ("Distillation") and count only the tokens whose `loss_mask` (`weights`) is
positive: padding and, for instruction data, prompt tokens never enter a sum or a denominator.

- `kd_sums`: the *sum* over loss tokens of `tau^2 * KL(softmax(z_T / tau) || softmax(z_S / tau))`
  (each token weighted by its loss weight) and the tokens' weight; like the LM loss, a sum and a
  count, so accumulation and data parallelism add pieces and divide once.
- `squarehead`: for each decoder block output h_l, `sum_t ||h_l^T - h_l^S||^2 / sum_t ||h_l^T||^2`
  over the loss tokens of the batch given, averaged over the L blocks. Its normaliser is the
  teacher's own energy over the same tokens, so the value is a ratio for the batch it is given,
  not a sum over tokens (docs/distill.md: how the train step combines micro-batches).

All reductions are float32 whatever the compute dtype.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

# Guards SquareHead's division when no token counts (an all-padding micro-batch: 0 / eps = 0).
SQUAREHEAD_EPS = 1e-8


def kd_token_loss(student_logits: Float[Array, "b t v"], teacher_logits: Float[Array, "b t v"],
                  tau: float) -> Float[Array, "b t"]:
    """tau^2 * KL(softmax(z_T / tau) || softmax(z_S / tau)) at every position, float32."""
    log_p_t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / tau, axis=-1)
    log_p_s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / tau, axis=-1)
    # exp(log_p_t) * (log_p_t - log_p_s); a teacher probability of exactly 0 contributes 0.
    # `== -inf`, not `> -inf`: a NaN teacher (non-finite logits) must give a NaN KD, not 0.
    kl = jnp.sum(jnp.where(log_p_t == -jnp.inf, 0.0, jnp.exp(log_p_t) * (log_p_t - log_p_s)),
                 axis=-1)
    return (tau * tau) * kl


def kd_sums(student_logits: Float[Array, "b t v"], teacher_logits: Float[Array, "b t v"],
            weights: Float[Array, "b t"], tau: float
            ) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """(sum over loss tokens of weight * KD, sum of the weights)."""
    weights = weights.astype(jnp.float32)
    kd = kd_token_loss(student_logits, teacher_logits, tau)
    # where, not multiply: what masked positions hold (inf, NaN) must not reach the sum.
    return jnp.sum(jnp.where(weights > 0, kd * weights, 0.0)), jnp.sum(weights)


def squarehead_per_layer(student_hidden: Float[Array, "l b t d"],
                         teacher_hidden: Float[Array, "l b t d"],
                         weights: Float[Array, "b t"]) -> Float[Array, " l"]:
    """Per block l: sum_t w_t ||h_T - h_S||^2 / (sum_t w_t ||h_T||^2 + eps), float32."""
    w = weights.astype(jnp.float32)
    counted = (w > 0)[None, :, :, None]
    h_t = teacher_hidden.astype(jnp.float32)
    h_s = student_hidden.astype(jnp.float32)
    diff = jnp.where(counted, jnp.square(h_t - h_s), 0.0)
    energy = jnp.where(counted, jnp.square(h_t), 0.0)
    num = jnp.einsum("lbtd,bt->l", diff, w)
    den = jnp.einsum("lbtd,bt->l", energy, w)
    return num / (den + SQUAREHEAD_EPS)


def squarehead(student_hidden: Float[Array, "l b t d"], teacher_hidden: Float[Array, "l b t d"],
               weights: Float[Array, "b t"]) -> Float[Array, ""]:
    """SquareHead over the loss tokens of this batch: `squarehead_per_layer` averaged over
    the blocks."""
    return jnp.mean(squarehead_per_layer(student_hidden, teacher_hidden, weights))
