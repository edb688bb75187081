"""SparseGPT and GPTQ: one OBS column sweep per linear layer.

The algorithm, its defaults and where we differ from the published code by convention:
`docs/algorithms.md`, sections "SparseGPT" and "GPTQ".

`prune_layer` prunes (unstructured per row-block, or N:M), optionally quantizing the kept
weights in the same sweep; `quantize_layer` is GPTQ (quantize only). Both run the one jitted
`_sweep` and differ only in how a column's target value q is chosen.

Layout and cost. The factor U (upper, U^T U = H^-1) comes from a blocked factorisation that
is almost all matmuls (pruning/inverse_factor.py). The sweep works on W^T (in, out) so that a weight
column is a contiguous row (`layout="in_out"` takes and returns that layout directly, as this
project stores a linear: no transposes). Columns go in blocks of `block_size` (the algorithm's
B: the unstructured comparison group and the lazy-update granularity). Inside a block,
columns go in sub-blocks of <= 16 (a loop of rank-1 updates on a cache-sized (16, out) slab),
then one small matmul carries a sub-block's errors to the rest of its block: mathematically
the same as per-column updates of the whole block, with far less memory traffic. After a
block, the lazy update of the remaining columns runs as one (B, B) x (B, out) matmul per later
block, in a loop with a dynamic trip count, so the flops stay triangular (~out * in^2 in all)
while every shape stays static: one compile serves every layer of a shape, whatever its
sparsity. The in-width is padded to a multiple of B with dead columns (weight 0, U = identity
there) that are excluded from selection. Measured on a 2-core CPU (benchmarks/sparsegpt.py):
about 2x the time of one (out, in) x (in, in) matmul for Llama-7B shapes, ~3x at 1024 x 1024
where the 1024 sequential column steps dominate.

Compile time. Every loop is a real loop (nothing unrolled over columns or factorisation
leaves), so the two programs of a layer shape, `inverse_factor._factor` and `_sweep`, compile in about 0.4-0.6
s and 0.7 s on a 2-core CPU up to a few thousand inputs (unrolled, they took 1-4 s and 3-5 s),
and no other program runs per call: a small model's cold prune is not dominated by compiles.

Failure path: a NaN or inf in the weight or the Hessian raises `NonFiniteError` (the driver
adds the layer and tensor): a silent fallback would write a model with an unnoticed broken
layer. The NaN/inf counts ride along in `inverse_factor._factor` (the Hessian's) and `_sweep` (the weight's);
the eager `check_finite`, which names the count, runs only once one is non-zero. A finite
Hessian whose factorisation fails (rounding makes it indefinite) is retried with 10x, 100x,
1000x dampening and then the identity (no error compensation), with a warning: the
factorisation is a separate jitted step that returns a success flag.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Bool, Float

from sparse_llama.pruning.inverse_factor import damped_factor
from sparse_llama.pruning.method import Method, check_mask_dtype, check_pattern
from sparse_llama.pruning.quantize import QuantGrid, fake_quantize, minmax_grid
from sparse_llama.sparsity.selection import check_finite, count_for, mask_smallest, mask_smallest_nm

_SUB = 16  # columns per sub-block of the sweep
def _sub_size(block: int, m: int) -> int:
    """Largest divisor of block that is a multiple of m (N:M groups stay in one sub-block)."""
    unit = max(m, 1)
    return max(s for s in range(unit, block + 1, unit)
               if block % s == 0 and s <= max(_SUB, unit))


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
    """The per-column OBS steps of one sub-block, as a loop. ws, kp, ks: (S, out); us: (S, S).

    kp: the selection so far (True = kept); ks: the mask being extended (or None).
    col_grid: per-column grids (scale, zero: (S, out)) instead of the one per-row `grid`.
    Returns (ws with its columns final, kp, the columns' errors (S, out)).
    A loop, not unrolled: one small body compiles in a fraction of the time that 16 unrolled
    steps took (most of a layer shape's compile: 2.5-5 s down to ~0.7 s per shape on a
    2-core CPU), at about the same run time.
    """
    size = ws.shape[0]
    idx = jnp.arange(size)
    d = jnp.diagonal(us)

    def column(j, c):
        ws, kp, errs = c
        wj = lax.dynamic_index_in_dim(ws, j, keepdims=False)
        gj = grid
        if col_grid is not None:
            gj = QuantGrid(*(lax.dynamic_index_in_dim(a, j, keepdims=False)[:, None]
                             for a in (col_grid.scale, col_grid.zero)),
                           col_grid.qmin, col_grid.qmax)
        qj = wj if gj is None else fake_quantize(wj[:, None], gj)[:, 0]
        qj = jnp.where(lax.dynamic_index_in_dim(kp, j, keepdims=False), qj, 0.0)
        ej = (wj - qj) / d[j]
        # Row j of U carries the error to the later columns (U is upper triangular).
        uj = jnp.where(idx > j, lax.dynamic_index_in_dim(us, j, keepdims=False), 0.0)
        upd = uj[:, None] * ej[None, :]
        ws = ws - (upd if ks is None else upd * ks)
        return (lax.dynamic_update_index_in_dim(ws, qj, j, 0), kp,
                lax.dynamic_update_index_in_dim(errs, ej, j, 0))

    carry = (ws, kp, jnp.zeros_like(ws))
    if pattern != "nm":
        # Two columns per iteration: less loop overhead (-20 to -40% at 688 x 256 and
        # 1024 x 1024 on a 2-core CPU), same compile time.
        return lax.fori_loop(0, size, column, carry, unroll=2)

    def group(g, c):
        ws, kp, errs = c
        # Scored on the already-updated weights of the group (docs/algorithms.md,
        # "SparseGPT"); rows of ws are inputs, so the group runs along axis 0.
        start = g * m
        scores = (lax.dynamic_slice_in_dim(ws, start, m)
                  / lax.dynamic_slice_in_dim(d, start, m)[:, None]) ** 2
        kg = mask_smallest_nm(scores, n, m, mask=lax.dynamic_slice_in_dim(kp, start, m), axis=0)
        kp = lax.dynamic_update_slice_in_dim(kp, kg, start, 0)
        return lax.fori_loop(start, start + m, column, (ws, kp, errs))

    return lax.fori_loop(0, size // m, group, carry)


@functools.partial(jax.jit,
                   static_argnames=("pattern", "n", "m", "block", "bits", "sym", "group",
                                    "layout"))
def _sweep(weight, u, dead, keep, k_full, k_tail, *, pattern, n, m, block, bits, sym, group=0,
           layout="out_in"):
    """Returns (weight float32, keep mask, grid or None, the weight's NaN/inf count), the
    weight and mask in `layout` ("out_in": (out, in); "in_out": (in, out), the sweep's own).

    group > 0 (it divides `block`): one grid per row and group of `group` input columns, set
    from the group's weights at the start of its block; the returned grid's scale and zero
    are then (out, in / group)."""
    with jax.default_matmul_precision("float32"):
        bad = jnp.sum(~jnp.isfinite(weight), dtype=jnp.int32)
        w = weight.astype(jnp.float32)
        if layout == "out_in":
            w, keep = w.T, None if keep is None else keep.T
        cols, rows = w.shape
        nb = -(-cols // block)
        cp = nb * block
        sub = _sub_size(block, m)

        w = jnp.where(dead[:, None], 0.0, w)
        if keep is not None:
            w = jnp.where(keep, w, 0.0)
        grid = None if bits is None or group else minmax_grid(w.T, bits, sym)
        grouped = bits is not None and group > 0
        # Group grids of every (padded) column group, filled block by block.
        groups = jnp.ones((cp // group if grouped else 0, rows), jnp.float32)
        wt = jnp.pad(w, ((0, cp - cols), (0, 0)))
        keep_t = None if keep is None else jnp.pad(keep, ((0, cp - cols), (0, 0)),
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
        kept = kept[:cols]
        w_out = jnp.where(kept, wt[:cols], 0.0)
        if layout == "out_in":
            w_out, kept = w_out.T, kept.T
        if grouped:
            ng = cols // group
            qmax = float(2 ** (bits - 1) - 1) if sym else float(2**bits - 1)
            grid = QuantGrid(g_scale[:ng].T, g_zero[:ng].T,
                             jnp.float32(-qmax if sym else 0.0), jnp.float32(qmax))
    return w_out, kept, grid, bad


_LAYOUTS = ("out_in", "in_out")


def _solve(weight, hessian, *, pattern, sparsity, n, m, block_size, dampening, mask, bits, sym,
           group=0, layout="out_in"):
    if layout not in _LAYOUTS:
        raise ValueError(f"layout={layout!r}: pass 'out_in' (Hugging Face) or 'in_out' (this "
                         "project's params)")
    flip = (lambda shape: tuple(shape)) if layout == "out_in" else (
        lambda shape: tuple(shape)[::-1])
    check_pattern(flip(weight.shape), sparsity, n, m, None if mask is None else flip(mask.shape),
                  block_size)
    check_mask_dtype(mask)
    rows, cols = flip(weight.shape)
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
    weight, hessian = jnp.asarray(weight), jnp.asarray(hessian)
    u, dead = damped_factor(hessian, dampening, weight)
    tail = cols - (-(-cols // block_size) - 1) * block_size
    k_full = count_for(sparsity, rows * min(block_size, cols))
    k_tail = count_for(sparsity, rows * tail)
    # float32 before the jit boundary: one compile per shape whatever the weight's dtype.
    w, kept, grid, bad = _sweep(weight.astype(jnp.float32), u, dead,
                                None if mask is None else jnp.asarray(mask), k_full, k_tail,
                                pattern=pattern, n=n, m=m, block=block_size, bits=bits,
                                sym=sym, group=group, layout=layout)
    if int(bad):
        check_finite(weight, "the weight")  # raises, naming the count
    return w.astype(weight.dtype), kept, grid


def prune_layer(weight: Float[Array | np.ndarray, "out in"],
                hessian: Float[Array | np.ndarray, "..."], *, sparsity: float, n: int = 0,
                m: int = 0, block_size: int = 128, dampening: float = 0.01,
                mask: Bool[Array | np.ndarray, "..."] | None = None,
                quant_bits: int | None = None, quant_sym: bool = False,
                layout: str = "out_in"
                ) -> tuple[Float[Array, "out in"], Bool[Array, "out in"]]:
    """SparseGPT-prune one linear layer. Returns (pruned weight, mask; True = kept).

    weight: (out, in), Hugging Face orientation, any float dtype (returned in that dtype;
      the solve runs in float32). hessian: (in, in) float, from `hessian.finalize`.
    layout="in_out": weight, mask and results are (in, out) instead, as this project's params
      store a linear (the sweep's own layout: no transposes, in or out of the solver). The
      shapes named below are then read transposed.
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
                        sym=quant_sym, layout=layout)
    return w, kept


def quantize_layer(weight: Float[Array | np.ndarray, "out in"],
                   hessian: Float[Array | np.ndarray, "..."], *, bits: int, sym: bool = False,
                   block_size: int = 128, dampening: float = 0.01,
                   mask: Bool[Array | np.ndarray, "..."] | None = None, group_size: int = 0,
                   layout: str = "out_in") -> tuple[Float[Array, "out in"], QuantGrid]:
    """GPTQ: quantize one linear layer with error compensation (`docs/algorithms.md`, "GPTQ").

    Returns (dequantized weight in the input dtype, the per-row grid: codes are
    `quantize.quantize(w, grid)`). With `mask` (a sparse model), masked entries stay exactly
    0 and the error propagation is multiplied by the mask. group_size > 0: one grid per row
    and group of consecutive inputs (it must divide the inputs, and divide or be a multiple
    of block_size), set when the sweep reaches the group's block (GPTQ's reference), and the
    grid's scale and zero are (out, in / group_size), whatever the `layout`. Other arguments
    as `prune_layer`.
    """
    if bits is None:
        raise ValueError("bits=None: pass the quantization width, e.g. bits=4")
    w, _, grid = _solve(weight, hessian, pattern="none", sparsity=0.0, n=0, m=0,
                        block_size=block_size, dampening=dampening, mask=mask, bits=bits,
                        sym=sym, group=group_size, layout=layout)
    return w, grid


@dataclasses.dataclass(frozen=True)
class SparseGPTParams:
    """SparseGPT's own hyper-parameters: the `pruning.*` keys its record takes."""

    block_size: int = 128  # the column block B: comparison group and lazy-update granularity
    dampening: float = 0.01  # lambda = dampening * mean(diag H)


def check_params(params: SparseGPTParams, n: int, m: int) -> None:
    """The config's values, before any work (the solver's own checks are looser: it takes a
    dampening of 0)."""
    if params.block_size < 1 or (m and params.block_size % m):
        raise ValueError(f"pruning.block_size={params.block_size} must be positive and a "
                         f"multiple of pruning.m={m} (default 128)")
    if params.dampening <= 0:
        raise ValueError(f"pruning.dampening={params.dampening} must be positive (default 0.01)")


def _solve_stored(params: SparseGPTParams, w_in_out, hessian, *, sparsity, n, m, mask):
    """The record's solve: the stored (in, out) layout is the sweep's own, so no transposes
    (four eager programs per shape fewer)."""
    return prune_layer(w_in_out, hessian, sparsity=sparsity, n=n, m=m,
                       block_size=params.block_size, dampening=params.dampening, mask=mask,
                       layout="in_out")


METHOD = Method(name="sparsegpt", stat="gram", solve=_solve_stored, params=SparseGPTParams(),
                check=check_params)
