"""How weights are chosen for pruning: the selection rules every one-shot pruner shares.

Magnitude, Wanda and SparseGPT (sparse_llama/pruning/) and the static masks of
`sparsity/static.py` all select with these, so they agree on ties. Every mask here, given or
returned, has the one polarity of the project: True = kept.
- `mask_smallest(scores, k)`: the mask that prunes exactly the k smallest scores of the array
  (or of each problem along leading batch axes), ties broken by row-major position (what a
  stable argsort of the flattened array does). It runs as a bisection on the float bits, not a
  sort: sorting a 1.4M-entry row-block on CPU costs ~0.3 s, and SparseGPT does it for every
  block of a layer. NaN scores (either sign) are never pruned.
- `mask_smallest_nm(scores, n, m)`: in every group of m consecutive entries along an axis,
  prune the n smallest, ties broken by position; NaN ranks as +inf (pruned last).
- Both take `mask` (an existing mask: its pruned entries stay pruned and count in the budget)
  so that extending a mask (50% -> 70%) keeps the old zeros and spends only the rest of it.
- Counts: `count_for(fraction, total)` = fraction * total rounded to the nearest integer.
- `check_finite`: the solvers refuse NaN/inf weights and statistics (a NaN score would
  otherwise be silently kept or pruned, and a NaN Hessian silently skip error compensation).

N:M groups run along the reduction (input) axis of a linear (`docs/algorithms.md`, "Masks").
"""

import math

import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Bool, Float, Int, Shaped

_INF_BITS = 0x7F800000  # bit pattern of float32 +inf: the largest non-NaN non-negative float


def count_for(fraction: float, total: int) -> int:
    """How many of `total` entries a `fraction` prunes: the nearest integer (exact in Python)."""
    return int(math.floor(fraction * total + 0.5))


class NonFiniteError(ValueError):
    """A weight, activation or statistic holds NaN/inf: pruning it would write a broken model.

    A ValueError, so that a command reports it on one `error:` line (exit status 2)."""


def check_finite(array: Shaped[Array | np.ndarray, "..."], what: str) -> None:
    """Raise NonFiniteError naming `what` when `array` holds NaN or inf (one device reduction)."""
    bad = int(jnp.sum(~jnp.isfinite(jnp.asarray(array))))
    if bad:
        raise NonFiniteError(f"{what} has {bad} NaN/inf entries; pruning cannot use it. Check "
                             "the checkpoint (a NaN weight) or the calibration inputs (an "
                             "overflow in a lower-precision dtype)")


def _count(mask, batch_dims: int):
    """Exact int32 count of True over the non-batch axes.

    float32 sums along the last axis (exact below 2^24 entries) then int sums: XLA's CPU
    reductions of float run several times faster than of int or bool.
    """
    partial = jnp.sum(jnp.where(mask, 1.0, 0.0), axis=-1).astype(jnp.int32)
    return jnp.sum(partial, axis=tuple(range(batch_dims, mask.ndim - 1)), dtype=jnp.int32)


def _bisect(count_at, lo, hi, steps: int):
    """Smallest t in (lo, hi] with count_at(t) >= need, given count_at(hi) >= need."""
    def halve(_, lo_hi):
        lo, hi = lo_hi
        mid = lo + (hi - lo) // 2
        enough = count_at(mid)
        return jnp.where(enough, lo, mid), jnp.where(enough, mid, hi)
    return lax.fori_loop(0, steps, halve, (lo, hi))[1]


def mask_smallest(scores: Float[Array, "*shape"], k: Int[Array, "*batch"] | int, *,
                  mask: Bool[Array, "*shape"] | None = None,
                  excluded: Bool[Array, "*shape"] | None = None,
                  batch_dims: int = 0) -> Bool[Array, "*shape"]:
    """The mask (True = kept) that prunes the k smallest scores, on top of `mask`'s zeros.

    The leading `batch_dims` axes index independent problems (k scalar or per problem); each
    problem is the rest of the array. `mask`'s pruned entries stay pruned and count towards k.
    scores must be >= 0; NaN (with either sign bit) and `excluded` entries are never pruned;
    with fewer than k candidates all are pruned. Ties break by row-major position within the
    problem. Cost: 31 counting passes, plus ~log2(size) more only when a tie straddles the
    threshold (sorting or a cumsum is 10-50x slower on CPU).
    """
    s = jnp.where(scores == 0, 0.0, scores.astype(jnp.float32))  # -0.0 sorts as +0.0
    pruned_before = jnp.zeros(s.shape, jnp.bool_) if mask is None else ~mask
    # NaN joins the never-pruned entries: a NaN with its sign bit set has a negative int32
    # pattern, which would otherwise sort first and be pruned first.
    stop = pruned_before | jnp.isnan(s)
    if excluded is not None:
        stop = stop | excluded
    # Non-negative float32 values order like their int32 bit patterns.
    bits = lax.bitcast_convert_type(jnp.where(stop, jnp.inf, s), jnp.int32)
    batch = s.shape[:batch_dims]

    def expand(v):
        return v.reshape(batch + (1,) * (s.ndim - batch_dims))

    k = jnp.broadcast_to(jnp.asarray(k, jnp.int32), batch) - _count(pruned_before, batch_dims)
    k = jnp.clip(k, 0, _count(bits < _INF_BITS, batch_dims))
    t = _bisect(lambda mid: _count(bits <= expand(mid), batch_dims) >= k,
                jnp.full(batch, -1, jnp.int32), jnp.full(batch, _INF_BITS, jnp.int32), 31)
    below = bits < expand(t)
    tie = bits == expand(t)
    need = k - _count(below, batch_dims)  # 0 <= need <= count(tie)
    n_tie = _count(tie, batch_dims)

    def first_ties(_):  # the first `need` ties in row-major order, by bisection on the index
        size = int(np.prod(s.shape[batch_dims:]))
        idx = lax.broadcasted_iota(jnp.int32, s.shape[batch_dims:], 0)
        for axis in range(1, s.ndim - batch_dims):
            idx = idx * s.shape[batch_dims + axis] + lax.broadcasted_iota(
                jnp.int32, s.shape[batch_dims:], axis)
        p = _bisect(lambda mid: _count(tie & (idx < expand(mid)), batch_dims) >= need,
                    jnp.full(batch, -1, jnp.int32), jnp.full(batch, size, jnp.int32),
                    max(1, size.bit_length()))
        return tie & (idx < expand(p))

    some = lax.cond(jnp.any((need > 0) & (need < n_tie)), first_ties,
                    lambda _: tie & expand(need > 0), None)
    return ~(pruned_before | below | some)


def mask_smallest_nm(scores: Float[Array, "*shape"], n: int, m: int, *,
                     mask: Bool[Array, "*shape"] | None = None, axis: int = -1
                     ) -> Bool[Array, "*shape"]:
    """The mask (True = kept) pruning the n smallest of each m consecutive entries on `axis`.

    `mask`'s pruned entries stay pruned and count towards the n; ties go to the earlier
    position; NaN ranks as +inf (comparisons with NaN are false, so it would otherwise rank
    first and be pruned first).
    """
    s = scores.astype(jnp.float32)
    s = jnp.where(jnp.isnan(s), jnp.inf, s)
    if mask is not None:
        s = jnp.where(mask, s, -jnp.inf)
    axis = axis % s.ndim
    g = s.reshape(s.shape[:axis] + (s.shape[axis] // m, m) + s.shape[axis + 1:])
    within = axis + 1  # the position-in-group axis of g
    a = jnp.expand_dims(g, within + 1)  # entry i on `within`, compared with ...
    b = jnp.expand_dims(g, within)  # ... entry j on `within + 1`
    idx = jnp.arange(m)
    earlier = (idx[None, :] < idx[:, None]).reshape((m, m) + (1,) * (g.ndim - within - 1))
    rank = jnp.sum((b < a) | ((b == a) & earlier), axis=within + 1)
    keep = (rank >= n).reshape(s.shape)
    return keep if mask is None else keep & mask
