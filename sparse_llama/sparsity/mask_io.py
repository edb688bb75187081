"""Masks on disk: an orbax checkpoint of the bool pytree, beside the dense checkpoint."""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from sparse_llama.sparsity.masks import check_masks


def save_masks(masks, directory: str | os.PathLike) -> str:
    """Write masks (orbax; atomic: a crash leaves no directory that looks complete)."""
    directory = os.path.abspath(os.fspath(directory))
    host = jax.tree.map(np.asarray, masks)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(directory, host, force=True)
    return directory


def load_masks(directory: str | os.PathLike, params=None):
    """Read masks saved by `save_masks`; with params, check that they fit them."""
    directory = os.path.abspath(os.fspath(directory))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no masks directory at {directory}")
    try:
        with ocp.StandardCheckpointer() as ckpt:
            masks = ckpt.restore(directory)
    except Exception as err:  # orbax raises many types for unreadable or partial checkpoints
        raise ValueError(f"{directory} is not a readable masks checkpoint ({err}); re-run the "
                         "pruning that wrote it") from err
    masks = jax.tree.map(lambda m: np.asarray(m, bool), masks)
    if params is not None:
        check_masks(params, masks)
    return masks
