"""Plain float64 numpy transcription of SparseGPT / GPTQ (`docs/algorithms.md`, "SparseGPT"
and "GPTQ").

The test reference for `sparse_llama.pruning.sparsegpt`: column by column, no tricks, written to
be checked against the text by eye. Selection ties break by stable argsort order (input-major
within a row-block, i.e. row-major in the library's (in, out) working layout), the rule the
library documents.
"""

import math

import numpy as np


def fake_quant(w, scale, zero, qmin, qmax):
    """Nearest value of a per-row grid; scale and zero are (rows,) arrays."""
    q = np.clip(np.round(w / scale) + zero, qmin, qmax)
    return scale * (q - zero)


def upper_factor(h):
    """U upper triangular with U^T U = H^-1: Cholesky of H, invert from the factor, Cholesky."""
    lower = np.linalg.cholesky(h)
    lower_inv = np.linalg.inv(lower)
    h_inv = lower_inv.T @ lower_inv
    return np.linalg.cholesky(h_inv).T


def sparsegpt(weight, hessian, *, sparsity=0.0, n=0, m=0, block_size=128, dampening=0.01,
              mask=None, grid=None, prune=True):
    """Returns (weight, keep mask). grid: optional (scale, zero, qmin, qmax) per-row arrays.

    prune=False gives GPTQ (quantize only; the mask, if any, is kept as it is).
    """
    w = np.array(weight, dtype=np.float64)
    h = np.array(hessian, dtype=np.float64)
    rows, cols = w.shape
    keep_in = np.ones((rows, cols), bool) if mask is None else np.array(mask, bool)

    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    w = w * keep_in
    h = h + dampening * np.mean(np.diag(h)) * np.eye(cols)
    u = upper_factor(h)
    pruned = ~keep_in

    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        if prune and n == 0:
            # One comparison group: the whole (rows, width) row-block.
            scores = w[:, start:end] ** 2 / np.diag(u)[start:end] ** 2
            k = math.floor(sparsity * scores.size + 0.5)
            old = pruned[:, start:end]
            k_new = max(k - int(old.sum()), 0)
            # Ties break input-major: stable argsort of the transposed block.
            order = np.argsort(np.where(old, np.inf, scores).T.reshape(-1), kind="stable")
            new = np.zeros(scores.size, bool)
            new[order[:k_new]] = True
            pruned[:, start:end] |= new.reshape(scores.T.shape).T
        errors = np.zeros((rows, end - start))
        for j in range(start, end):
            if prune and n > 0 and j % m == 0:
                scores = w[:, j:j + m] ** 2 / np.diag(u)[j:j + m] ** 2
                for r in range(rows):
                    s = np.where(pruned[r, j:j + m], -np.inf, scores[r])
                    order = np.argsort(s, kind="stable")
                    pruned[r, j + order[:n]] = True
            col = w[:, j].copy()
            q = col.copy() if grid is None else fake_quant(col, *grid)
            q[pruned[:, j]] = 0.0
            e = (col - q) / u[j, j]
            w[:, j:end] -= np.outer(e, u[j, j:end]) * keep_in[:, j:end]
            w[:, j] = q
            errors[:, j - start] = e
        w[:, end:] -= (errors @ u[start:end, end:]) * keep_in[:, end:]
    return w, ~pruned
