"""The one seam every weight matmul of the decoder blocks goes through.

A weight leaf of the params is either a dense array stored (in, out), or a *structured weight*:
a registered pytree type (a packed sparse weight in sparse_llama/kernels, an int8 weight with
scales in the INT8 work) that implements

    matmul(x)      -> x @ W in x's dtype (its own kernel or reference)
    astype(dtype)  -> the weight prepared for a compute dtype (e.g. values cast, codes kept)

    logical_axes(base) -> (optional) the same type with each array field replaced by a tuple of
                      logical axis names, given the dense weight's names `base` (e.g.
                      ("layers", "embed", "mlp")); model/sharding.py calls it for a leaf that
                      has it, so a structured weight shards by its own layout. Names that the
                      mesh rules do not know stay replicated.

A structured weight stacked over the layer axis carries that axis first on every array field
(lax.scan and `llama.layer_params` slice it like a dense leaf); its `matmul` sees one layer.
The packed sparse types are `sparse_llama.kernels.bitmask.BitmaskWeight` and
`sparse_llama.kernels.two_four.TwoFourWeight` (docs/kernels.md).

`linear(x, w)` on a dense array is exactly today's `x @ w` (same program), so the dense path
costs nothing; `cast(w, dtype)` is `w.astype(dtype)` for both kinds.
"""

from typing import Protocol, runtime_checkable

import jax
import numpy as np
from jaxtyping import Array, Float


@runtime_checkable
class StructuredWeight(Protocol):
    """What a non-array weight leaf implements (annotations: `Float[Array, "i o"] | StructuredWeight`)."""

    def matmul(self, x): ...

    def astype(self, dtype): ...


def is_dense(w) -> bool:
    """True for a plain (in, out) array (a jax array, a tracer or numpy)."""
    return isinstance(w, jax.Array | np.ndarray)


def cast(w, dtype):
    """`w` prepared for compute in `dtype` (dense: cast; structured: its own `astype`)."""
    return w.astype(dtype)


def linear(x: Float[Array, "*b i"], w) -> Float[Array, "*b o"]:
    """x @ W for a dense or structured weight leaf."""
    if is_dense(w):
        return x @ w
    return w.matmul(x)
