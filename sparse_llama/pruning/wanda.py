"""Wanda: prune by |W_ij| * ||X_j||_2, compared within each output row.

Formula, defaults and published numbers: `docs/algorithms.md`, "Wanda".

No weight update, no Hessian: only the per-input-feature squared norms of the calibration
inputs, accumulated with `sparse_llama.pruning.hessian.accumulate_sq_norms`. The diagonal of the
SparseGPT Hessian is the same quantity up to a positive global factor (2/n), and any positive
global factor leaves the per-row ranking unchanged, so `jnp.diag(H)` works as well.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

from sparse_llama.pruning.method import Method, check_mask_dtype, check_pattern, solve_out_in
from sparse_llama.sparsity.selection import check_finite, count_for, mask_smallest, mask_smallest_nm


@functools.partial(jax.jit, static_argnames=("n", "m"))
def _wanda(weight, sq_norms, mask, k, *, n, m):
    norms = jnp.sqrt(jnp.maximum(sq_norms.astype(jnp.float32), 0.0))
    scores = jnp.abs(weight.astype(jnp.float32)) * norms[None, :]
    if n:
        keep = mask_smallest_nm(scores, n, m, mask=mask)
    else:  # one problem per output row
        keep = mask_smallest(scores, k, mask=mask, batch_dims=1)
    return jnp.where(keep, weight, jnp.zeros((), weight.dtype)), keep


def prune_layer(weight: Float[Array | np.ndarray, "out in"],
                input_sq_norms: Float[Array | np.ndarray, "..."], *, sparsity: float,
                n: int = 0, m: int = 0, mask: Bool[Array | np.ndarray, "..."] | None = None
                ) -> tuple[Float[Array, "out in"], Bool[Array, "out in"]]:
    """Wanda pruning of one (out, in) weight. Returns (pruned weight, mask; True = kept).

    input_sq_norms: (in,) SQUARED L2 norms ||X_j||_2^2 of every input feature over all
      calibration tokens (sum of x_j^2; the square root is taken here). Any positive global
      scale is fine (e.g. the mean over tokens, or diag(H) of the SparseGPT Hessian).
    Unstructured: in each row, prune the `count_for(sparsity, in)` smallest |W_ij| ||X_j||
    (old pruned entries of `mask` count towards it and stay pruned). N:M (n, m > 0): the n
    smallest of every m consecutive inputs of each row; `sparsity` is then not used.
    Raises ValueError on a malformed request, NonFiniteError on a NaN/inf weight or norm.
    """
    check_pattern(tuple(weight.shape), sparsity, n, m, None if mask is None else mask.shape)
    check_mask_dtype(mask)
    if tuple(input_sq_norms.shape) != (weight.shape[1],):
        raise ValueError(f"input_sq_norms has shape {tuple(input_sq_norms.shape)}; pass the "
                         f"({weight.shape[1]},) squared input-feature norms of this layer")
    weight = jnp.asarray(weight)
    check_finite(weight, "the weight")
    check_finite(input_sq_norms, "the squared input norms")
    k = count_for(sparsity, weight.shape[1])
    keep = None if mask is None else jnp.asarray(mask)
    return _wanda(weight, jnp.asarray(input_sq_norms), keep, k, n=n, m=m)


METHOD = Method(name="wanda", stat="sqnorm", solve=solve_out_in(prune_layer))
