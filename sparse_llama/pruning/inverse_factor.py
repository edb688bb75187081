"""The inverse Cholesky factor of a damped Hessian: the U (upper, U^T U = (H + lambda I)^-1)
every SparseGPT / GPTQ column sweep runs on (pruning/sparsegpt.py).

It is almost all matmuls: a blocked elimination for sizes up to _BASE and a recursion on 2x2
blocks above it, with plain XLA ops rather than LAPACK calls (see `_leaf_cholesky_inverse`).
`damped_factor` adds the dampening, fixes dead inputs (a zero diagonal) and retries with more
dampening, then the identity, when rounding makes the damped Hessian indefinite.
"""

import warnings

import jax
import jax.numpy as jnp
from jax import lax

from sparse_llama.sparsity.selection import check_finite

_LEAF = 128  # block of the factorisation: one sequential elimination loop of this size
_BASE = 1024  # sizes up to this factorise in one blocked loop; larger ones split recursively


def _leaf_cholesky_inverse(a):
    """L^-1 for a small a = L L^T (L lower), as column-by-column elimination on [a | I].

    Each step j subtracts l r^T with r = row_j / sqrt(pivot), which eliminates column j of the
    left part and applies the same elementary step to the right part, so it ends as L^-1.
    Plain XLA ops, not LAPACK: XLA's CPU potrf/trsm custom calls go to a multithreaded OpenBLAS
    whose threads fight XLA's own for the cores and stall erratically (0.3 ms or 130 ms for the
    same 256 x 256 call; 0.5 s for 688 x 688 on a 2-core CPU).
    """
    size = a.shape[0]
    t = jnp.concatenate([a, jnp.eye(size, dtype=a.dtype)], axis=1)
    idx = jnp.arange(size)

    def step(j, t):
        row = lax.dynamic_index_in_dim(t, j, keepdims=False)
        root = jnp.sqrt(lax.dynamic_index_in_dim(row, j, keepdims=False))  # NaN if not PD
        col = lax.dynamic_index_in_dim(t, j, axis=1, keepdims=False)
        lower = jnp.where(idx > j, col / root, 0.0)
        r = row / root
        # Row j of the left part is never read again, so it may keep r's left part.
        return lax.dynamic_update_index_in_dim(t - lower[:, None] * r[None, :], r, j, 0)

    return jnp.tril(lax.fori_loop(0, size, step, t)[:, size:])


def _blocked_cholesky_inverse(a):
    """L^-1 for a = L L^T, size a multiple of _LEAF: the leaf's elimination by blocks of rows.

    Step k factors the current pivot block (L_kk^-1 by the leaf), scales block row k of
    [a | I] by it and eliminates block column k below it with one rank-_LEAF matmul. Block row
    k's live entries are its left part from column k on and its right part up to column k:
    one window of size + _LEAF columns, so the update costs ~2 size^3 flops in all, with one
    compiled loop body whatever the size (a recursion unrolls one loop per leaf).
    """
    size, leaf = a.shape[0], _LEAF
    t = jnp.concatenate([a, jnp.eye(size, dtype=a.dtype)], axis=1)
    below = jnp.arange(size)[:, None]

    def step(k, t):
        start = k * leaf
        rows = lax.dynamic_slice(t, (start, start), (leaf, size + leaf))
        inv = _leaf_cholesky_inverse(rows[:, :leaf])
        rows = inv @ rows
        col = lax.dynamic_slice(t, (0, start), (size, leaf))
        col = jnp.where(below >= start + leaf, col, 0.0) @ inv.T  # L below the pivot
        window = lax.dynamic_slice(t, (0, start), (size, size + leaf)) - col @ rows
        t = lax.dynamic_update_slice(t, window, (0, start))
        return lax.dynamic_update_slice(t, rows, (start, start))

    return jnp.tril(lax.fori_loop(0, size // leaf, step, t)[:, size:])


def _split(size: int) -> int:
    """Where the recursion splits `size` (a multiple of _LEAF): near the middle, on a _LEAF
    boundary."""
    return -(-(size // 2) // _LEAF) * _LEAF


def _cholesky_inverse(a):
    """L^-1 for a = L L^T, size a multiple of _LEAF; recursive on 2x2 blocks above _BASE.

    With a = [[A, B^T], [B, C]]: L11 = chol(A), L21 = B L11^-T, L22 = chol(C - L21 L21^T),
    and (L^-1)21 = -L22^-1 L21 L11^-1: all but the base cases run as matmuls (~size^3 / 3
    flops at the top levels). Static shapes: the recursion unrolls at trace time.
    """
    size = a.shape[0]
    if size <= _BASE:
        return _blocked_cholesky_inverse(a)
    half = _split(size)
    inv11 = _cholesky_inverse(a[:half, :half])
    l21 = a[half:, :half] @ inv11.T
    inv22 = _cholesky_inverse(a[half:, half:] - l21 @ l21.T)
    inv21 = -(inv22 @ l21) @ inv11
    top = jnp.concatenate([inv11, jnp.zeros((half, size - half), a.dtype)], axis=1)
    return jnp.concatenate([top, jnp.concatenate([inv21, inv22], axis=1)], axis=0)


def _inverse_factor(h):
    """U upper triangular with U^T U = h^-1: U = P L^-1 P with P h P = L L^T (P reverses).

    (h = R R^T with R = U^-1 upper is the "UL" Cholesky of h, i.e. the Cholesky of the
    order-reversed h read backwards.) By uniqueness of Cholesky factors this is the
    reference's chol(inv(chol(H))) factor, without forming H^-1. The size is padded to a
    multiple of _LEAF with an identity block, which decouples exactly (U gets an identity
    block there, cut off again).
    """
    size = h.shape[0]
    padded = -(-size // _LEAF) * _LEAF
    a = h[::-1, ::-1]
    if padded != size:
        a = jnp.pad(a, ((0, padded - size), (0, padded - size)))
        a = a + jnp.diag((jnp.arange(padded) >= size).astype(a.dtype))
    return _cholesky_inverse(a)[:size, :size][::-1, ::-1]


@jax.jit
def _factor(hessian, damp_ratio):
    """(U, dead, ok, bad): U upper triangular with U^T U = (H + lambda I)^-1 after the dead
    fix; bad counts the Hessian's NaN/inf entries (the check rides along: a separate check
    would be one more program to compile per shape)."""
    with jax.default_matmul_precision("float32"):
        h = hessian.astype(jnp.float32)
        d = jnp.diagonal(h)
        dead = d == 0
        d_fixed = jnp.where(dead, 1.0, d)
        # diag(H) <- d_fixed + lambda, lambda = ratio * mean(d_fixed)
        h = h + jnp.diag(d_fixed - d + damp_ratio * jnp.mean(d_fixed))
        u = _inverse_factor(h)
        ok = jnp.all(jnp.isfinite(u)) & jnp.all(jnp.diagonal(u) > 0)
    return u, dead, ok, jnp.sum(~jnp.isfinite(hessian), dtype=jnp.int32)


def damped_factor(hessian, dampening: float, weight):
    """U and dead columns; retries with more dampening, then the identity, with a warning.

    A NaN/inf Hessian raises NonFiniteError, after the weight's own check (the weight is
    named first when both are broken)."""
    tries = [dampening] + [max(dampening, 0.01) * 10.0**i for i in (1, 2, 3)]
    dead = None
    for ratio in tries:
        u, d, ok, bad = _factor(hessian, jnp.float32(ratio))
        if dead is None:
            if int(bad) or not bool(ok):  # eager checks only on these rare paths
                check_finite(weight, "the weight")
                check_finite(hessian, "the Hessian of its inputs")
            dead = d
        if bool(ok):
            if ratio != dampening:
                warnings.warn(f"sparsegpt / gptq: Cholesky of the damped Hessian failed with "
                              f"dampening={dampening}; succeeded with dampening={ratio}. Check "
                              "the calibration inputs (too few tokens).", stacklevel=4)
            return u, dead
    warnings.warn(f"sparsegpt / gptq: Cholesky of the Hessian failed even with dampening={tries[-1]} "
                  "(a non-positive-definite Hessian); using the identity: this layer "
                  "gets no error compensation (magnitude selection per block). Check the "
                  "calibration inputs.", stacklevel=4)
    return jnp.eye(hessian.shape[0], dtype=jnp.float32), dead
