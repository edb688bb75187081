"""Random training batches (every token counted, one document per row) for step tests."""

import jax.numpy as jnp
import numpy as np


def random_batch(vocab_size: int, b: int, t: int, seed: int = 0) -> dict:
    """The loop's batch keys for b rows of t random next-token pairs."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, vocab_size, (b, t + 1)).astype(np.int32)
    return {"inputs": jnp.asarray(x[:, :-1]), "targets": jnp.asarray(x[:, 1:]),
            "segment_ids": jnp.ones((b, t), jnp.int32),
            "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)),
            "loss_mask": jnp.ones((b, t), jnp.float32)}
