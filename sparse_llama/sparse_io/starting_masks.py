"""Which mask a prune or a quantization of a checkpoint starts from: what it prunes stays
exactly 0 (launch.prune with `pruning.keep_zeros`, launch.quantize; commands/prune.py and
commands/quantize.py both ask `starting_masks`).

- `<hf_path>/masks` when that directory exists (a launch.prune output, a sparse export): the
  mask as saved, so a kept weight that is exactly zero (a GPTQ code that rounded to 0, a
  zero-initialised weight) stays kept and may become nonzero;
- else the checkpoint's exact zeros in the target tensors (`masks_from_zeros`);
- none (every weight kept) when the run does not keep the old mask (`pruning.keep_zeros=False`).

Masks that prune a nonzero weight belong to another checkpoint: refused, naming the tensors.
"""

import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sparse_llama.ground.tree_paths import path_name
from sparse_llama.sparse_io import mask_io
from sparse_llama.sparsity.masks import check_masks, masks_from_zeros


class StartingMasks(NamedTuple):
    """The masks of a checkpoint: those in `directory`, or with None its exact zeros."""

    directory: str | None

    def block(self, layer: int, block: dict) -> dict:
        """Decoder block `layer`'s masks (the pruning driver's `initial_masks(i, block)`),
        reading only that block's masks."""
        if self.directory is None:
            return masks_from_zeros(block)
        masks = mask_io.load_block_masks(self.directory, layer)
        _check_fit(block, masks, f"{self.directory} (block {layer})")
        return masks

    def tree(self, params: dict) -> dict:
        """The whole model's masks (a model in memory: launch.quantize)."""
        if self.directory is None:
            return masks_from_zeros(params)
        masks = mask_io.load_masks(self.directory)
        _check_fit(params, masks, self.directory)
        return masks


def starting_masks(hf_path: str, keep: bool = True) -> StartingMasks | None:
    """The masks a run on `hf_path` keeps (module docstring); None when it keeps none.
    Reads nothing but the masks file's header, so a damaged file stops the run before any
    weight is loaded."""
    if not keep:
        return None
    directory = os.path.join(hf_path, "masks") if hf_path else ""
    if not os.path.isdir(directory):
        return StartingMasks(None)
    mask_io.check_readable(directory)
    return StartingMasks(os.path.abspath(directory))


def _check_fit(params: dict, masks: dict, source: str) -> None:
    """The masks' tree and shapes fit the params, and every weight they prune is 0."""
    try:
        check_masks(params, masks)
    except ValueError as err:
        raise ValueError(f"the masks in {source} do not fit the model: {err}") from None
    bad = []
    for (path, w), m in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                            jax.tree.leaves(masks), strict=True):
        if np.ndim(m):
            n = int(jnp.sum(jnp.where(jnp.asarray(m), False, jnp.asarray(w) != 0)))
            if n:
                bad.append(f"{path_name(path)} ({n} nonzero)")
    if bad:
        raise ValueError(f"the masks in {source} prune nonzero weights: {', '.join(bad[:4])}; "
                         "they are not this checkpoint's masks: delete that masks/ directory "
                         "(the exact zeros are then the mask), or prune from no mask "
                         "(pruning.keep_zeros=False)")
