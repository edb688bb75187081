"""Calibration statistics of a linear layer's inputs, accumulated batch by batch.

- Hessian for SparseGPT/GPTQ (`docs/algorithms.md`, "SparseGPT"): H = (2/n) sum_k X_k X_k^T
  over the n calibration *sequences* X_k (d x L), kept as a running average in float32 so
  that it never depends on how the sequences were batched.
- Squared input-feature norms for Wanda ("Wanda"): sq_j = sum over all tokens of x_j^2, i.e.
  ||X_j||_2^2; `wanda.prune_layer` takes this and the square root itself.
- Per-feature maxima max_k |x_j| for SmoothQuant (docs/quantization.md, "SmoothQuant").

Both are pure functions of (state, x_btd) -> state, so they can run inside a jitted forward
(one state per hooked linear). States are NamedTuples of arrays, i.e. pytrees.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int


class HessianState(NamedTuple):
    hessian: Float[Array, "d d"]  # running (2/n) sum_k X_k X_k^T
    count: Int[Array, ""]  # n: sequences seen so far


class SqNormState(NamedTuple):
    sq_norms: Float[Array, " d"]  # sum over tokens of x_j^2
    tokens: Int[Array, ""]


def init(d: int) -> HessianState:
    """An empty Hessian accumulator for a layer with d inputs.

    Built on the host and copied over: `jnp.zeros` would compile one broadcast program per
    width (~0.05 s each on a CPU, before the first pass can start)."""
    return HessianState(jnp.asarray(np.zeros((d, d), np.float32)),
                        jnp.asarray(np.zeros((), np.int32)))


def accumulate(state: HessianState, x_btd: Float[Array, "b t d"]) -> HessianState:
    """Fold in a batch of b sequences of t tokens: H <- (n H + 2 sum_k X_k X_k^T) / (n + b)."""
    b = x_btd.shape[0]
    count = state.count + b
    x = x_btd.reshape(-1, x_btd.shape[-1]).astype(jnp.float32)
    # Full float32 products: TF32/bf16 passes on GPU would bias the small eigenvalues.
    xtx = jnp.matmul(x.T, x, precision=jax.lax.Precision.HIGHEST)
    old = state.count.astype(jnp.float32) / count.astype(jnp.float32)
    hessian = state.hessian * old + xtx * (2.0 / count.astype(jnp.float32))
    return HessianState(hessian, count)


@jax.jit
def _symmetrised(h):
    return 0.5 * (h + h.T)


def finalize(state: HessianState) -> Float[Array, "d d"]:
    """The (d, d) float32 Hessian (symmetrised: summation order can break exact symmetry).

    One jitted program per width, not three eager ones (transpose, add, multiply), each of
    which compiles on its first use."""
    return _symmetrised(state.hessian)


def init_sq_norms(d: int) -> SqNormState:
    return SqNormState(jnp.asarray(np.zeros((d,), np.float32)),
                       jnp.asarray(np.zeros((), np.int32)))


def accumulate_sq_norms(state: SqNormState, x_btd: Float[Array, "b t d"]) -> SqNormState:
    """Add sum over the batch's tokens of x_j^2 (float32) to every input feature j."""
    x = x_btd.astype(jnp.float32)
    sq = state.sq_norms + jnp.sum(x * x, axis=(0, 1))
    return SqNormState(sq, state.tokens + x_btd.shape[0] * x_btd.shape[1])


def finalize_sq_norms(state: SqNormState) -> Float[Array, " d"]:
    """(d,) ||X_j||_2^2 over all calibration tokens: the second argument of wanda.prune_layer."""
    return state.sq_norms


class AbsMaxState(NamedTuple):
    absmax: Float[Array, " d"]  # max over tokens of |x_j|


def init_absmax(d: int) -> AbsMaxState:
    return AbsMaxState(jnp.asarray(np.zeros((d,), np.float32)))


def accumulate_absmax(state: AbsMaxState, x_btd: Float[Array, "b t d"]) -> AbsMaxState:
    """Fold in the batch's max |x_j| per input feature (SmoothQuant's activation statistic)."""
    return AbsMaxState(jnp.maximum(state.absmax,
                                   jnp.max(jnp.abs(x_btd.astype(jnp.float32)), axis=(0, 1))))


def finalize_absmax(state: AbsMaxState) -> Float[Array, " d"]:
    """(d,) max over all calibration tokens of |x_j|."""
    return state.absmax


def from_gram(kind: str | None, hessian: Float[Array, "d d"] | None):
    """The statistic `kind` of a linear's inputs ('gram', 'sqnorm' or None) read off their
    Hessian, for a pass that gathers only that (quantization's): 'sqnorm' is diag(H), which is
    ||X_j||_2^2 times 2/n, and no per-row ranking sees a positive global factor."""
    if kind is None:
        return None
    return hessian if kind == "gram" else jnp.diagonal(hessian)
