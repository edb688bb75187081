"""Pack a model's prunable weights for serving (`--config.model.packed=bitmask|2:4`)."""

from collections.abc import Sequence

import jax

from sparse_llama.ground.tree_paths import path_name
from sparse_llama.kernels.ops import FORMATS, pack
from sparse_llama.model.linear import is_dense
from sparse_llama.sparsity.masks import DEFAULT_TARGETS, is_target


def check_packed_option(packed: str) -> None:
    if packed and packed not in FORMATS:
        raise ValueError(f"model.packed={packed!r} is not a packed format; use one of "
                         f"{sorted(FORMATS)} or '' (dense)")


def pack_params(params: dict, format: str, targets: Sequence[str] = DEFAULT_TARGETS) -> dict:
    """params with every targeted decoder-block weight (stacked (L, in, out)) packed as
    `format` (kept entries: the nonzeros, i.e. the pruned model's mask); other leaves as is."""
    check_packed_option(format)

    def one(path, w):
        name = path_name(path)
        if not (name.startswith("layers/") and is_target(name, targets)):
            return w
        if not is_dense(w):
            raise ValueError(f"{name} is a {type(w).__name__}, not a float array: the packed "
                             "sparse kernels take float weights (an int8 checkpoint needs "
                             "model.quantized=none to be packed)")
        try:
            return pack(w, format)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None

    return jax.tree_util.tree_map_with_path(one, params, is_leaf=lambda x: not is_dense(x)
                                            and hasattr(x, "matmul"))
