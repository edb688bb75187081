"""Magnitude pruning (`docs/algorithms.md`, "Magnitude"): one threshold per matrix at the
`sparsity` quantile of |W|; N:M prunes the n smallest |W| per group of m inputs.

No data: the record below needs no statistic of the inputs. The selection rules it shares
with Wanda and SparseGPT (ties, NaN, extending a mask) are `sparsity/selection.py`'s.
N:M groups run along the reduction (input) axis of a linear: the last axis of a Hugging Face
(out, in) weight, which is what `prune_layer` takes (`docs/algorithms.md`, "Masks").
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

from sparse_llama.pruning.method import Method, check_mask_dtype, check_pattern, solve_out_in
from sparse_llama.sparsity.selection import check_finite, count_for, mask_smallest, mask_smallest_nm


@functools.partial(jax.jit, static_argnames=("n", "m"))
def _magnitude(weight, mask, k, *, n, m):
    scores = jnp.abs(weight.astype(jnp.float32))
    if n:
        keep = mask_smallest_nm(scores, n, m, mask=mask)
    else:
        keep = mask_smallest(scores, k, mask=mask)
    return jnp.where(keep, weight, jnp.zeros((), weight.dtype)), keep


def prune_layer(weight: Float[Array | np.ndarray, "out in"], *, sparsity: float, n: int = 0,
                m: int = 0, mask: Bool[Array | np.ndarray, "..."] | None = None
                ) -> tuple[Float[Array, "out in"], Bool[Array, "out in"]]:
    """Magnitude pruning of one (out, in) weight. Returns (pruned weight, mask; True = kept).

    Unstructured: the `count_for(sparsity, out * in)` entries with the smallest |W| over the
    whole matrix (old pruned entries of `mask` included in that count and kept pruned).
    N:M (n, m > 0): the n smallest |W| of every m consecutive inputs of each row; `sparsity`
    is then not used (the pattern fixes it at n/m). The weight keeps its dtype.
    Raises ValueError on a malformed request, NonFiniteError on a NaN/inf weight.
    """
    check_pattern(tuple(weight.shape), sparsity, n, m, None if mask is None else mask.shape)
    check_mask_dtype(mask)
    weight = jnp.asarray(weight)
    check_finite(weight, "the weight")
    k = count_for(sparsity, weight.size)
    return _magnitude(weight, None if mask is None else jnp.asarray(mask), k, n=n, m=m)


METHOD = Method(name="magnitude", stat=None,
                solve=solve_out_in(lambda w, _stat, **pattern: prune_layer(w, **pattern)))
