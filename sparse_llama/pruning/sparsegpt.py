"""SparseGPT and GPTQ: one OBS column sweep per linear layer.

The algorithm, its defaults and where we differ from the published code by convention:
`docs/algorithms.md`, sections "SparseGPT" and "GPTQ".

`prune_layer` prunes (unstructured per row-block, or N:M), optionally quantizing the kept
weights in the same sweep; `quantize_layer` is GPTQ (quantize only). Both run the one jitted
`_sweep` and differ only in how a column's target value q is chosen.

Layout and cost. The factor U (upper, U^T U = H^-1) comes from a recursive blocked
factorisation that is almost all matmuls (`_inverse_factor`). The sweep works on W^T (in, out)
so that a weight column is a contiguous row. Columns go in blocks of `block_size` (the
algorithm's B: the unstructured comparison group and the lazy-update granularity). Inside a
block, columns go in sub-blocks of <= 16 (Python-unrolled rank-1 updates on a cache-sized
(16, out) slab), then one small matmul carries a sub-block's errors to the rest of its block:
mathematically the same as per-column updates of the whole block, with far less memory traffic.
After a block, the lazy update of the remaining columns runs as one (B, B) x (B, out) matmul
per later block, in a loop with a dynamic trip count, so the flops stay triangular
(~out * in^2 in all) while every shape stays static: one compile serves every layer of a
shape, whatever its sparsity. The in-width is padded to a multiple of B with dead columns
(weight 0, U = identity there) that are excluded from selection. Measured on a 2-core CPU
(benchmarks/sparsegpt.py): about 1-2x the time of one (out, in) x (in, in) matmul for Llama-7B
shapes, ~3-4x at 1024 x 1024 where the 1024 sequential column steps dominate.

Failure path: a NaN or inf in the weight or the Hessian raises `NonFiniteError` (the driver
adds the layer and tensor): a silent fallback would write a model with an unnoticed broken
layer. A finite Hessian whose factorisation fails (rounding makes it indefinite) is retried
with 10x, 100x, 1000x dampening and then the identity (no error compensation), with a warning:
the factorisation is a separate jitted step that returns a success flag.
"""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Bool, Float

from sparse_llama.pruning.magnitude import (
    check_finite,
    check_mask_dtype,
    check_pattern,
    count_for,
    mask_smallest,
    mask_smallest_nm,
)
from sparse_llama.pruning.quantize import QuantGrid, fake_quantize, minmax_grid

_SUB = 16  # columns per unrolled sub-block
_LEAF = 128  # Cholesky leaf size of the recursive factorisation


def _split(size: int) -> int:
    """Where the recursive factorisation splits `size`: near the middle, on a _LEAF boundary."""
    return -(-(size // 2) // _LEAF) * _LEAF if size > 2 * _LEAF else size // 2


def _leaf_inverse_factor(a):
    """U upper triangular with U^T U = a^-1 for a small a, in plain XLA ops.

    Cholesky of the order-reversed a as symmetric elimination on [S | M] = [P a P | I]: each
    step subtracts l r^T with r = row_j / sqrt(pivot), which eliminates column j of S and
    applies the same elementary step to M, so M ends as L^-1 and U = P L^-1 P. Not LAPACK:
    XLA's CPU potrf/trsm custom calls go to a multithreaded OpenBLAS whose threads fight XLA's
    own for the cores and stall erratically (0.3 ms or 130 ms for the same 256 x 256 call).
    """
    size = a.shape[0]
    t = jnp.concatenate([a[::-1, ::-1], jnp.eye(size, dtype=a.dtype)], axis=1)
    idx = jnp.arange(size)

    def step(j, t):
        row = lax.dynamic_index_in_dim(t, j, keepdims=False)
        root = jnp.sqrt(lax.dynamic_index_in_dim(row, j, keepdims=False))  # NaN if not PD
        col = lax.dynamic_index_in_dim(t, j, axis=1, keepdims=False)
        lower = jnp.where(idx > j, col / root, 0.0)
        r = row / root
        # Row j of S is never read again, so it may keep r's S part.
        return lax.dynamic_update_index_in_dim(t - lower[:, None] * r[None, :], r, j, 0)

    t = lax.fori_loop(0, size, step, t)
    return jnp.triu(t[:, size:][::-1, ::-1])


def _inverse_factor(h):
    """U upper triangular with U^T U = h^-1, recursively on 2x2 blocks, mostly as matmuls.

    With h = [[A, B^T], [B, C]] and h = R R^T, R = U^-1 upper triangular ("UL" Cholesky):
    R22 R22^T = C, R12 = B^T R22^-T, R11 R11^T = A - R12 R12^T, and U12 = -U11 R12 U22.
    By uniqueness of Cholesky factors this is the reference's chol(inv(chol(H))) factor,
    without forming H^-1; all but the O(in * _LEAF^2) leaf work runs as matmuls. Static
    shapes: the recursion unrolls at trace time (in / _LEAF leaves).
    """
    size = h.shape[0]
    if size <= _LEAF:
        return _leaf_inverse_factor(h)
    half = _split(size)
    u22 = _inverse_factor(h[half:, half:])
    r12 = h[:half, half:] @ u22.T
    u11 = _inverse_factor(h[:half, :half] - r12 @ r12.T)
    u12 = -(u11 @ r12) @ u22
    bottom = jnp.concatenate([jnp.zeros((size - half, half), h.dtype), u22], axis=1)
    return jnp.concatenate([jnp.concatenate([u11, u12], axis=1), bottom], axis=0)


@jax.jit
def _factor(hessian, damp_ratio):
    """(U, dead, ok): U upper triangular with U^T U = (H + lambda I)^-1 after the dead fix."""
    with jax.default_matmul_precision("float32"):
        h = hessian.astype(jnp.float32)
        d = jnp.diagonal(h)
        dead = d == 0
        d_fixed = jnp.where(dead, 1.0, d)
        # diag(H) <- d_fixed + lambda, lambda = ratio * mean(d_fixed)
        h = h + jnp.diag(d_fixed - d + damp_ratio * jnp.mean(d_fixed))
        u = _inverse_factor(h)
        ok = jnp.all(jnp.isfinite(u)) & jnp.all(jnp.diagonal(u) > 0)
    return u, dead, ok


def _sub_size(block: int, m: int) -> int:
    """Largest divisor of block that is a multiple of m (N:M groups stay in one sub-block)."""
    unit = max(m, 1)
    return max(s for s in range(unit, block + 1, unit)
               if block % s == 0 and s <= max(_SUB, unit))


def _column_grid(grid: QuantGrid, j: int) -> QuantGrid:
    """Column j's grid from per-column grids (scale, zero: (S, out)): GPTQ's group grids."""
    return QuantGrid(grid.scale[j][:, None], grid.zero[j][:, None], grid.qmin, grid.qmax)


def _group_grids(w1, bits: int, sym: bool, group: int):
    """Grids of the column groups of a block w1 (block, out), from its values at the block's
    start (GPTQ's `find_params(W[:, i:i + groupsize])`): per-column grids (block, out) and the
    groups' (scale, zero), each (block // group, out)."""
    size, rows = w1.shape
    ng = size // group
    g = minmax_grid(jnp.transpose(w1.reshape(ng, group, rows), (0, 2, 1)).reshape(-1, group),
                    bits, sym)
    scale, zero = g.scale.reshape(ng, rows), g.zero.reshape(ng, rows)
    per_col = QuantGrid(jnp.repeat(scale, group, axis=0), jnp.repeat(zero, group, axis=0),
                        g.qmin, g.qmax)
    return per_col, scale, zero


def _columns(ws, us, kp, ks, grid, *, pattern, n, m, col_grid=None):
    """The per-column OBS steps of one sub-block, unrolled. ws, kp, ks: (S, out); us: (S, S).

    kp: the selection so far (True = kept); ks: the mask being extended (or None).
    col_grid: per-column grids (scale, zero: (S, out)) instead of the one per-row `grid`."""
    size = ws.shape[0]
    d = jnp.diagonal(us)
    errs = []
    for j in range(size):
        if pattern == "nm" and j % m == 0:
            # Scored on the already-updated weights of the group (docs/algorithms.md,
            # "SparseGPT"); rows of ws are inputs, so the group runs along axis 0.
            scores = (ws[j:j + m] / d[j:j + m, None]) ** 2
            kp = kp.at[j:j + m].set(mask_smallest_nm(scores, n, m, mask=kp[j:j + m], axis=0))
        wj = ws[j]
        gj = grid if col_grid is None else _column_grid(col_grid, j)
        qj = wj if gj is None else fake_quantize(wj[:, None], gj)[:, 0]
        qj = jnp.where(kp[j], qj, 0.0)
        ej = (wj - qj) / d[j]
        if j + 1 < size:
            upd = us[j, j + 1:, None] * ej[None, :]
            ws = ws.at[j + 1:].add(-upd if ks is None else -upd * ks[j + 1:])
        ws = ws.at[j].set(qj)
        errs.append(ej)
    return ws, kp, jnp.stack(errs)


@functools.partial(jax.jit,
                   static_argnames=("pattern", "n", "m", "block", "bits", "sym", "group"))
def _sweep(weight, u, dead, keep, k_full, k_tail, *, pattern, n, m, block, bits, sym, group=0):
    """Returns (weight (out, in) float32, keep mask (out, in), grid or None).

    group > 0 (it divides `block`): one grid per row and group of `group` input columns, set
    from the group's weights at the start of its block; the returned grid's scale and zero
    are then (out, in / group)."""
    with jax.default_matmul_precision("float32"):
        rows, cols = weight.shape
        nb = -(-cols // block)
        cp = nb * block
        sub = _sub_size(block, m)

        w = jnp.where(dead[None, :], 0.0, weight.astype(jnp.float32))
        if keep is not None:
            w = jnp.where(keep, w, 0.0)
        grid = None if bits is None or group else minmax_grid(w, bits, sym)
        grouped = bits is not None and group > 0
        # Group grids of every (padded) column group, filled block by block.
        groups = jnp.ones((cp // group if grouped else 0, rows), jnp.float32)
        wt = jnp.pad(w.T, ((0, cp - cols), (0, 0)))
        keep_t = None if keep is None else jnp.pad(keep.T, ((0, cp - cols), (0, 0)),
                                                   constant_values=True)
        kept = jnp.ones((cp, rows), jnp.bool_) if keep_t is None else keep_t
        up, is_pad = u, None
        if cp != cols:  # only then: U is the largest buffer of a 70B layer
            up = jnp.pad(u, ((0, cp - cols), (0, cp - cols)))
            up = up + jnp.diag((jnp.arange(cp) >= cols).astype(jnp.float32))
            is_pad = (jnp.arange(cp) >= cols)[:, None]

        def block_step(b, carry):
            wt, kept, g_scale, g_zero = carry
            start = b * block
            w1 = lax.dynamic_slice_in_dim(wt, start, block)
            col_grid = None
            if grouped:
                col_grid, scale1, zero1 = _group_grids(w1, bits, sym, group)
                g_scale = lax.dynamic_update_slice_in_dim(g_scale, scale1, start // group, 0)
                g_zero = lax.dynamic_update_slice_in_dim(g_zero, zero1, start // group, 0)
            u1 = lax.dynamic_slice(up, (start, start), (block, block))
            k1 = None if keep_t is None else lax.dynamic_slice_in_dim(keep_t, start, block)
            kp1 = lax.dynamic_slice_in_dim(kept, start, block)
            if pattern == "unstructured":
                scores = (w1 / jnp.diagonal(u1)[:, None]) ** 2
                excluded = None if is_pad is None else jnp.broadcast_to(
                    lax.dynamic_slice_in_dim(is_pad, start, block), w1.shape)
                k = jnp.where(b == nb - 1, k_tail, k_full)
                # One comparison group: the whole row-block (ties: input-major order).
                kp1 = mask_smallest(scores, k, mask=kp1, excluded=excluded)

            def sub_step(s, c):
                w1, kp1, e1 = c
                off = s * sub
                ws, us_ = (lax.dynamic_slice_in_dim(w1, off, sub),
                           lax.dynamic_slice(u1, (off, off), (sub, sub)))
                kps = lax.dynamic_slice_in_dim(kp1, off, sub)
                ks = None if k1 is None else lax.dynamic_slice_in_dim(k1, off, sub)
                cg = None if col_grid is None else jax.tree.map(
                    lambda a: lax.dynamic_slice_in_dim(a, off, sub) if a.ndim else a, col_grid)
                ws, kps, es = _columns(ws, us_, kps, ks, grid, pattern=pattern, n=n, m=m,
                                       col_grid=cg)
                w1 = lax.dynamic_update_slice_in_dim(w1, ws, off, 0)
                kp1 = lax.dynamic_update_slice_in_dim(kp1, kps, off, 0)
                e1 = lax.dynamic_update_slice_in_dim(e1, es, off, 0)
                u_rows = lax.dynamic_slice_in_dim(u1, off, sub)
                u_rows = jnp.where(jnp.arange(block)[None, :] >= off + sub, u_rows, 0.0)
                upd = u_rows.T @ es
                return w1 - (upd if k1 is None else upd * k1), kp1, e1

            w1, kp1, e1 = lax.fori_loop(0, block // sub, sub_step,
                                        (w1, kp1, jnp.zeros_like(w1)))
            wt = lax.dynamic_update_slice_in_dim(wt, w1, start, 0)
            kept = lax.dynamic_update_slice_in_dim(kept, kp1, start, 0)

            def lazy_step(c, wt):  # one later block of columns per matmul
                upd = lax.dynamic_slice(up, (start, c * block), (block, block)).T @ e1
                if keep_t is not None:
                    upd = upd * lax.dynamic_slice_in_dim(keep_t, c * block, block)
                return lax.dynamic_update_slice_in_dim(
                    wt, lax.dynamic_slice_in_dim(wt, c * block, block) - upd, c * block, 0)

            wt = lax.fori_loop(b + 1, nb, lazy_step, wt)
            return wt, kept, g_scale, g_zero

        wt, kept, g_scale, g_zero = lax.fori_loop(0, nb, block_step,
                                                  (wt, kept, groups, jnp.zeros_like(groups)))
        kept = kept[:cols].T
        w_out = jnp.where(kept, wt[:cols].T, 0.0)
        if grouped:
            ng = cols // group
            qmax = float(2 ** (bits - 1) - 1) if sym else float(2**bits - 1)
            grid = QuantGrid(g_scale[:ng].T, g_zero[:ng].T,
                             jnp.float32(-qmax if sym else 0.0), jnp.float32(qmax))
    return w_out, kept, grid


def _damped_factor(hessian, dampening: float):
    """U and dead columns; retries with more dampening, then the identity, with a warning."""
    tries = [dampening] + [max(dampening, 0.01) * 10.0**i for i in (1, 2, 3)]
    dead = None
    for ratio in tries:
        u, d, ok = _factor(hessian, jnp.float32(ratio))
        dead = d if dead is None else dead
        if bool(ok):
            if ratio != dampening:
                warnings.warn(f"sparsegpt: Cholesky of the damped Hessian failed with "
                              f"dampening={dampening}; succeeded with dampening={ratio}. Check "
                              "the calibration inputs (too few tokens).", stacklevel=4)
            return u, dead
    warnings.warn(f"sparsegpt: Cholesky of the Hessian failed even with dampening={tries[-1]} "
                  "(a non-positive-definite Hessian); using the identity: this layer "
                  "gets no error compensation (magnitude selection per block). Check the "
                  "calibration inputs.", stacklevel=4)
    return jnp.eye(hessian.shape[0], dtype=jnp.float32), dead


def _solve(weight, hessian, *, pattern, sparsity, n, m, block_size, dampening, mask, bits, sym,
           group=0):
    check_pattern(tuple(weight.shape), sparsity, n, m, None if mask is None else mask.shape,
                  block_size)
    check_mask_dtype(mask)
    cols = weight.shape[1]
    if tuple(hessian.shape) != (cols, cols):
        raise ValueError(f"hessian has shape {tuple(hessian.shape)} but the weight has "
                         f"{cols} inputs; pass the ({cols}, {cols}) Hessian of this layer's "
                         "inputs (sparse_llama.pruning.hessian)")
    if not dampening >= 0:
        raise ValueError(f"dampening={dampening}: pass a non-negative fraction of mean(diag H)")
    if bits is not None and not 2 <= bits <= 16:
        raise ValueError(f"quant bits={bits}: pass an integer width in [2, 16] (e.g. 4 or 8)")
    if group and (cols % group or (block_size % group and group % block_size)):
        raise ValueError(f"group_size={group} must divide the layer's {cols} inputs and divide "
                         f"or be a multiple of block_size={block_size}")
    block_size = max(block_size, group)  # a group spans whole blocks: same updates, one grid
    weight = jnp.asarray(weight)
    check_finite(weight, "the weight")
    check_finite(hessian, "the Hessian of its inputs")
    u, dead = _damped_factor(jnp.asarray(hessian), dampening)
    rows = weight.shape[0]
    tail = cols - (-(-cols // block_size) - 1) * block_size
    k_full = count_for(sparsity, rows * min(block_size, cols))
    k_tail = count_for(sparsity, rows * tail)
    # float32 before the jit boundary: one compile per shape whatever the weight's dtype.
    w, kept, grid = _sweep(weight.astype(jnp.float32), u, dead,
                           None if mask is None else jnp.asarray(mask), k_full, k_tail,
                           pattern=pattern, n=n, m=m, block=block_size, bits=bits, sym=sym,
                           group=group)
    return w.astype(weight.dtype), kept, grid


def prune_layer(weight: Float[Array | np.ndarray, "out in"],
                hessian: Float[Array | np.ndarray, "..."], *, sparsity: float, n: int = 0,
                m: int = 0, block_size: int = 128, dampening: float = 0.01,
                mask: Bool[Array | np.ndarray, "..."] | None = None,
                quant_bits: int | None = None, quant_sym: bool = False
                ) -> tuple[Float[Array, "out in"], Bool[Array, "out in"]]:
    """SparseGPT-prune one linear layer. Returns (pruned weight, mask; True = kept).

    weight: (out, in), Hugging Face orientation, any float dtype (returned in that dtype;
      the solve runs in float32). hessian: (in, in) float, from `hessian.finalize`.
    sparsity: unstructured: in every row-block of (out, block_size) columns, prune
      `count_for(sparsity, out * width)` weights with the smallest W^2 / U_jj^2 (an existing
      `mask`'s pruned entries count towards it). n, m > 0: N:M along the inputs; `sparsity`
      is then not used (the pattern fixes it at n / m).
    mask: optional (out, in) bool mask to extend: its pruned entries stay exactly zero and
      no error update reaches them.
    quant_bits / quant_sym: also quantize the kept weights in the same sweep (per-row grid of
      the weights before this pruning, dead inputs and `mask` zeros applied; see
      `quantize.minmax_grid`); pruned entries stay exactly 0.
    Raises ValueError on a malformed request and NonFiniteError (a ValueError) on a NaN/inf
    weight or Hessian; a finite Hessian that cannot be factorised only warns (see above).
    """
    pattern = "nm" if n else "unstructured"
    w, kept, _ = _solve(weight, hessian, pattern=pattern, sparsity=sparsity, n=n, m=m,
                        block_size=block_size, dampening=dampening, mask=mask, bits=quant_bits,
                        sym=quant_sym)
    return w, kept


def quantize_layer(weight: Float[Array | np.ndarray, "out in"],
                   hessian: Float[Array | np.ndarray, "..."], *, bits: int, sym: bool = False,
                   block_size: int = 128, dampening: float = 0.01,
                   mask: Bool[Array | np.ndarray, "..."] | None = None, group_size: int = 0
                   ) -> tuple[Float[Array, "out in"], QuantGrid]:
    """GPTQ: quantize one linear layer with error compensation (`docs/algorithms.md`, "GPTQ").

    Returns (dequantized weight in the input dtype, the per-row grid: codes are
    `quantize.quantize(w, grid)`). With `mask` (a sparse model), masked entries stay exactly
    0 and the error propagation is multiplied by the mask. group_size > 0: one grid per row
    and group of consecutive inputs (it must divide the inputs, and divide or be a multiple
    of block_size), set when the sweep reaches the group's block (GPTQ's reference), and the
    grid's scale and zero are (out, in / group_size). Other arguments as `prune_layer`.
    """
    if bits is None:
        raise ValueError("bits=None: pass the quantization width, e.g. bits=4")
    w, _, grid = _solve(weight, hessian, pattern="none", sparsity=0.0, n=0, m=0,
                        block_size=block_size, dampening=dampening, mask=mask, bits=bits,
                        sym=sym, group=group_size)
    return w, grid
