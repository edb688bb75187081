"""Which units a layer keeps this step: top-k of the scores, or k drawn without replacement
with probabilities softmax(normalised score / temperature) (Gumbel-top-k).

Normalisation (`sat.normalize`), per layer, before the temperature: `max` (default) divides by
the layer's largest score (scores in [0, 1], so temperature 0.05 spans logits 0..20), `sum`
divides by the layer's total (probabilities; near-uniform sampling for wide layers), `zscore`
subtracts the mean and divides by the standard deviation. Top-k ignores the normalisation.
Gumbel-top-k: adding independent Gumbel(0, 1) noise to the logits and taking the top k is
exactly sequential sampling without replacement from softmax(logits) (the Plackett-Luce
model); with k = 1 the kept unit is a draw from softmax(logits). Kept indices are returned
sorted ascending (contiguous gathers, and the same set gives the same arrays).
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

SELECTIONS = ("topk", "sampling")
NORMALIZATIONS = ("max", "sum", "zscore")


def normalize(scores: Float[Array, "m n"], how: str) -> Float[Array, "m n"]:
    """Per-row normalisation of the scores (see the module docstring)."""
    s = scores.astype(jnp.float32)
    if how == "max":
        top = jnp.max(s, axis=-1, keepdims=True)
        return s / jnp.where(top > 0, top, 1.0)
    if how == "sum":
        total = jnp.sum(s, axis=-1, keepdims=True)
        return s / jnp.where(total > 0, total, 1.0)
    if how == "zscore":
        std = jnp.std(s, axis=-1, keepdims=True)
        return (s - jnp.mean(s, axis=-1, keepdims=True)) / jnp.where(std > 0, std, 1.0)
    raise ValueError(f"sat.normalize={how!r} is not one of {NORMALIZATIONS}")


def select(scores: Float[Array, "m n"], k: int, key: jax.Array | None, *, selection: str,
           temperature: float = 0.05, normalization: str = "max") -> Int[Array, "m k"]:
    """Indices (sorted, int32) of the k units kept in each row of `scores`."""
    scores = jax.lax.stop_gradient(scores)
    if selection == "topk":
        keys = scores.astype(jnp.float32)
    elif selection == "sampling":
        logits = normalize(scores, normalization) / temperature
        keys = logits + jax.random.gumbel(key, scores.shape, jnp.float32)
    else:
        raise ValueError(f"sat.selection={selection!r} is not one of {SELECTIONS}")
    _, idx = jax.lax.top_k(keys, k)
    return jnp.sort(idx, axis=-1).astype(jnp.int32)
