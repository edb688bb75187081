"""What a one-shot pruning method is: the record every method file defines, and the checks of
a pruning request that every method's solver runs.

A method is one file (sparsegpt.py, wanda.py, magnitude.py) that ends with its `Method`
record; `pruning/methods.py` is the registry of them by name (`pruning.method`), and the
driver runs whichever record it is given (`driver.PruneSpec.method`), never a name.

The solve contract. `solve(params, w, stat, *, sparsity, n, m, mask) -> (w, mask)`:
- w: one linear as this project stores it, (in, out); the result has its shape and dtype,
  pruned entries exact zeros. mask: None or an (in, out) bool mask to extend (True = kept;
  what it prunes stays pruned and counts towards the budget); the result is the new mask.
- stat: the method's statistic of the linear's inputs, of the kind it names in `stat`
  ('gram': the Hessian (2/n) sum X X^T, 'sqnorm': sum over tokens of x_j^2, None: no data).
- sparsity: the fraction to prune (unstructured); n, m > 0: N:M along the inputs instead.
- params: the method's own hyper-parameters (its record's `params`, configured).
It raises ValueError for a request it cannot run and `NonFiniteError` on NaN/inf inputs.
"""

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class NoParams:
    """The hyper-parameters of a method that has none beyond the sparsity pattern."""


def _no_check(params, n: int, m: int) -> None:
    del params, n, m


class Method(NamedTuple):
    """One pruning method (see the module doc for `solve`).

    name: its `pruning.method` value. stat: the statistic of each linear's input it needs.
    params: its own hyper-parameters, a frozen dataclass whose fields are the `pruning.*` keys
      it takes, with the method's defaults (SparseGPT: block_size, dampening).
    check(params, n, m): raise ValueError, naming the key, for hyper-parameters that cannot
      run with the N:M pattern n:m (commands call it before any work).
    """

    name: str
    stat: str | None
    solve: Callable
    params: Any = NoParams()
    check: Callable[[Any, int, int], None] = _no_check

    @property
    def keys(self) -> tuple[str, ...]:
        """The `pruning.*` config keys of the method's own hyper-parameters."""
        return tuple(f.name for f in dataclasses.fields(self.params))


def solve_out_in(prune_layer: Callable) -> Callable:
    """A `solve` from a solver of Hugging Face (out, in) weights,
    `prune_layer(w, stat, *, sparsity, n, m, mask) -> (w, mask)` with no hyper-parameters:
    the stored (in, out) weight goes in transposed, as float32, and comes back in its dtype."""
    def solve(params, w_in_out, stat, *, sparsity: float, n: int, m: int, mask):
        del params
        new_w, new_mask = prune_layer(w_in_out.T.astype(jnp.float32), stat, sparsity=sparsity,
                                      n=n, m=m, mask=None if mask is None else mask.T)
        return new_w.T.astype(w_in_out.dtype), new_mask.T
    return solve


def check_pattern(weight_shape: tuple[int, ...], sparsity: float, n: int, m: int,
                  mask_shape: tuple[int, ...] | None, block_size: int | None = None) -> None:
    """Raise ValueError, naming the problem and the fix, for a bad pruning request."""
    if len(weight_shape) != 2:
        raise ValueError(f"weight must be 2-D (out, in) as Hugging Face stores it; got shape "
                         f"{weight_shape}: reshape it or prune each matrix separately")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity={sparsity} is outside [0, 1); pass the fraction of weights "
                         "to prune, e.g. 0.5")
    if (n == 0) != (m == 0) or n < 0 or m < 0:
        raise ValueError(f"n={n}, m={m}: pass both n and m positive for N:M (e.g. n=2, m=4), "
                         "or both 0 for unstructured")
    if n > m:
        raise ValueError(f"n={n} > m={m}: N:M prunes n of every m consecutive inputs, so n <= m")
    if m and weight_shape[1] % m:
        raise ValueError(f"m={m} does not divide the input width {weight_shape[1]}; N:M groups "
                         "run along the input axis, pick m dividing it or prune unstructured")
    if block_size is not None:
        if block_size <= 0:
            raise ValueError(f"block_size={block_size}: pass a positive block size (128)")
        if m and block_size % m:
            raise ValueError(f"block_size={block_size} is not a multiple of m={m}; N:M groups "
                             "must not straddle blocks, pick block_size as a multiple of m")
    if mask_shape is not None and tuple(mask_shape) != tuple(weight_shape):
        raise ValueError(f"mask has shape {tuple(mask_shape)} but the weight has shape "
                         f"{tuple(weight_shape)}; pass a bool mask of the weight's (out, in) shape")


def check_mask_dtype(mask) -> None:
    if mask is not None and mask.dtype != jnp.bool_:
        raise ValueError(f"mask has dtype {mask.dtype}; pass a bool mask (True = kept), "
                         "e.g. mask.astype(bool)")
