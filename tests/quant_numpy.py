"""Plain float64 numpy transcriptions for the quantization tests (docs/quantization.md).

GPTQ as its reference code runs it (Frantar et al., `fasterquant`), column by column: per-row
min-max grids (symmetric or not), optional groups whose grid is set from the weights as they
stood at the start of the current block, optional act-order, and a keep mask whose pruned
entries stay 0 and receive no error update. Also the W8A8 integer reference.
"""

import numpy as np
from sparsegpt_numpy import upper_factor


def minmax(w, bits, sym):
    """Per-row (scale, zero, qmin, qmax) of w (rows, cols)."""
    if sym:
        qmax = 2 ** (bits - 1) - 1
        absmax = np.abs(w).max(axis=1)
        scale = np.where(absmax == 0, 1.0, absmax / qmax)
        return scale, np.zeros_like(scale), -qmax, qmax
    qmax = 2**bits - 1
    lo, hi = np.minimum(w.min(axis=1), 0), np.maximum(w.max(axis=1), 0)
    empty = (lo == 0) & (hi == 0)
    lo, hi = np.where(empty, -1.0, lo), np.where(empty, 1.0, hi)
    scale = (hi - lo) / qmax
    return scale, np.round(-lo / scale), 0, qmax


def gptq(weight, hessian, *, bits, sym=True, block_size=128, dampening=0.01, mask=None,
         group_size=0, act_order=False):
    """Returns (weight, tie): tie[r] is the smallest distance of any rounding of row r to a
    half-integer (where float32 and float64 may round differently)."""
    w = np.array(weight, np.float64)
    h = np.array(hessian, np.float64)
    rows, cols = w.shape
    keep = np.ones((rows, cols), bool) if mask is None else np.array(mask, bool)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    w = w * keep
    if act_order:
        perm = np.argsort(-np.diag(h), kind="stable")
        w, h, keep = w[:, perm], h[perm][:, perm], keep[:, perm]
    h = h + dampening * np.mean(np.diag(h)) * np.eye(cols)
    u = upper_factor(h)
    grid = None if group_size else minmax(w, bits, sym)
    tie = np.full(rows, np.inf)
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        at_start = w.copy()
        errors = np.zeros((rows, end - start))
        for j in range(start, end):
            if group_size and j % group_size == 0:
                grid = minmax(at_start[:, j:j + group_size], bits, sym)
            scale, zero, qmin, qmax = grid
            col = w[:, j].copy()
            x = col / scale + zero
            inside = (x > qmin) & (x < qmax)
            tie = np.minimum(tie, np.where(inside & keep[:, j],
                                           np.abs(x - np.floor(x) - 0.5), np.inf))
            q = scale * (np.clip(np.round(x), qmin, qmax) - zero)
            q[~keep[:, j]] = 0.0
            e = (col - q) / u[j, j]
            w[:, j:end] -= np.outer(e, u[j, j:end]) * keep[:, j:end]
            w[:, j] = q
            errors[:, j - start] = e
        w[:, end:] -= (errors @ u[start:end, end:]) * keep[:, end:]
    if act_order:
        w = w[:, np.argsort(perm)]
    return w, tie


def w8a8(x, codes, scale):
    """(int64 accumulator, float64 output) of x (tokens, in) times codes (in, out) int8."""
    x = np.asarray(x, np.float32)
    absmax = np.abs(x).max(axis=-1, keepdims=True)
    sx = np.where(absmax > 0, absmax / np.float32(127), np.float32(1)).astype(np.float32)
    qx = np.clip(np.round(x / sx), -127, 127).astype(np.int64)
    acc = qx @ np.asarray(codes, np.int64)
    return qx, acc, acc * sx.astype(np.float64) * np.asarray(scale, np.float64)
