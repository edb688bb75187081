"""Layer-streamed pruning: a checkpoint pruned block by block, in bounded host memory.

`launch.prune` never holds the model: the embeddings, final norm and lm_head are read first
(`read_params(index, None)`), then each decoder block is read from the safetensors when the
driver reaches it, pruned (driver.prune_blocks), and its weights, masks and report counts are
streamed into the output's files (safetensors_stream.ShardedWriter, mask_io.MaskWriter) before
the next block is read. Peak host memory is about the embeddings and head, two copies of one
block (as read, and pruned) and the calibration activations, whatever the depth: a Llama-2-70B
prunes on a host with a fraction of its 280 GB of float32 weights.

With evaluation windows the dense and the pruned model's perplexities come from the same pass:
each window set's hidden states advance through the block as read and the block as pruned, and
the head scores them at the end (the computation of `llama.forward`, block by block).
"""

import ctypes
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sparse_llama.eval.perplexity import perplexity_of
from sparse_llama.ground.tree_paths import get_path, path_name
from sparse_llama.model import hf_io, llama, sharding
from sparse_llama.model.config import LlamaConfig
from sparse_llama.model.loss import token_nll
from sparse_llama.model.safetensors_stream import ShardedWriter
from sparse_llama.pruning import driver
from sparse_llama.sparse_io import mask_io
from sparse_llama.sparse_io import report as report_lib
from sparse_llama.sparsity.masks import DEFAULT_TARGETS, is_target


class Source(NamedTuple):
    """A model to prune: `embed()` (embed_tokens), `block(i)` and `head()` (the final norm
    and lm_head when untied), each read when called, so nothing is held longer than needed."""

    embed: Callable[[], Any]
    block: Callable[[int], dict]
    head: Callable[[], dict]


def return_freed_memory() -> None:
    """Have glibc give freed buffers of 1 MB and more back to the system at once.

    By default glibc raises its mmap threshold to the size of each large block freed (up to
    32 MB), after which blocks of that size come from its heap and stay resident when freed:
    block after block, ~0.4 GB of the streamed pruner's peak on a 1.35B model was memory it
    had already let go (measured: 2.09 -> 1.68 GB). Other C libraries: nothing to do.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    libc.mallopt(m_mmap_threshold, 1 << 20)
    libc.mallopt(m_trim_threshold, 1 << 20)


def checkpoint_source(index: hf_io.CheckpointIndex, param_dtype) -> Source:
    """A checkpoint on disk, read tensor by tensor."""
    read = functools.partial(hf_io.read_params, index, np_dtype=np.dtype(param_dtype))
    return Source(lambda: read(None, names=("model.embed_tokens.weight",))["embed_tokens"],
                  read, lambda: read(None, names=("model.norm.weight", "lm_head.weight")))


def params_source(params: dict) -> Source:
    """A params tree in memory (a preset model)."""
    return Source(lambda: params["embed_tokens"], driver.blocks_of(params),
                  lambda: {k: v for k, v in params.items() if k in ("norm", "lm_head")})


def mask_leaves(config: LlamaConfig) -> dict:
    """The mask tree `driver.prune_model` would return, as `mask_io.mask_leaves` describes it."""
    shapes = jax.tree_util.tree_flatten_with_path(
        llama.param_shapes(config), is_leaf=lambda x: isinstance(x, tuple))[0]
    return {path_name(p): (tuple(s) if is_target(path_name(p), DEFAULT_TARGETS) else None)
            for p, s in shapes}


@functools.partial(jax.jit, static_argnames=("config",))
def _head_nll(top: dict, x, tokens, config: LlamaConfig):
    """Summed next-token NLL of final hidden states `x` (b, t, d) of windows `tokens`."""
    return jnp.sum(token_nll(llama.head_logits(top, x, config)[:, :-1], tokens[:, 1:]))


def _perplexity(top: dict, acts: driver.Activations, windows: np.ndarray, batch_size: int,
                config: LlamaConfig) -> float:
    """Perplexity over `windows` from their final hidden states (NaN or inf when the model's
    logits are not finite: the summary reports those as null)."""
    total = sum(float(_head_nll(top, acts.place(x), jnp.asarray(windows[i:i + batch_size]),
                                config))
                for i, x in zip(range(0, windows.shape[0], batch_size), acts.chunks,
                                strict=True))
    return perplexity_of(total / (windows.shape[0] * (windows.shape[1] - 1)))


def _write_top(writer: ShardedWriter | None, top: dict, entries, np_dtype) -> None:
    """The tensors of `entries` outside the blocks (`top` holds exactly them)."""
    for name, path, _, transpose in entries:
        if writer is not None:
            writer.add(name, hf_io.stored_tensor(np.asarray(get_path(top, path)), None,
                                                 transpose, np_dtype, name=name))


def prune_to_dir(source: Source, config: LlamaConfig, windows: np.ndarray,
                 spec: driver.PruneSpec, directory: str | Path, *, dtype: str, initial_masks: Callable | None = None, mesh=None, rules=None,
                 eval_windows: np.ndarray | None = None, eval_batch_size: int = 8,
                 progress: Callable | None = None) -> tuple[dict, float | None, float | None]:
    """Prune `source` into `directory` (which exists): model.safetensors (or shards) in
    `dtype`, masks/ and nothing else (the caller adds config and tokenizer files, the report).

    Returns (the sparsity report, dense perplexity, pruned perplexity); the perplexities are
    None without `eval_windows` (n, t). Process 0 writes; every process of
    a multi-host run calls it. The embeddings are written and let go before the first block
    is read, the final norm and lm_head read after the last one.
    """
    directory = Path(directory)
    np_dtype = np.dtype(jnp.dtype(dtype))
    primary = jax.process_index() == 0
    entries = hf_io.table_entries(config.num_layers, config.tie_word_embeddings)
    writer = masks_out = None
    if primary:
        writer = ShardedWriter(directory, hf_io.hf_tensor_specs(config, dtype),
                               max_shard_bytes=hf_io.DEFAULT_MAX_SHARD_BYTES,
                               metadata={"format": "pt"})
        masks_out = mask_io.MaskWriter(directory / "masks", mask_leaves(config))
    embed = jnp.asarray(source.embed())
    _write_top(writer, {"embed_tokens": embed}, entries[:1], np_dtype)
    evals = None
    if eval_windows is not None:
        chunks = driver.embed_windows(embed, eval_windows, config, eval_batch_size)
        evals = [driver.Activations(chunks, mesh, rules)] * 2  # dense, pruned
    inputs = driver.embed_windows(embed, windows, config, spec.batch_size)
    del embed  # the windows are embedded: the table is not needed again
    counts = report_lib.WrittenCounts(config)  # what is written: masked, cast
    for done in driver.prune_blocks(source.block, inputs, config, spec,
                                    initial_masks=initial_masks,
                                    mesh=mesh, rules=rules, keep_dense=evals is not None):
        for name, path, layer, transpose in (e for e in entries if e[2] == done.layer):
            leaf = path[1:]
            w = sharding.host_array(get_path(done.pruned, leaf))
            m = get_path(done.masks, leaf)
            keep = sharding.host_array(m) if np.ndim(m) else None
            if keep is not None and primary:
                masks_out.add("/".join(path), layer, keep)
            stored = hf_io.stored_tensor(w, keep, transpose, np_dtype, name=name)
            counts(name, stored)
            if primary:
                writer.add(name, stored)
        if evals is not None:
            evals = [evals[0].advance(done.dense, config), evals[1].advance(done.pruned, config)]
        if progress is not None:
            progress(done.layer)
    head = source.head()
    _write_top(writer, head, entries[-len(head):], np_dtype)
    if primary:
        writer.close()
        masks_out.close()
    if config.tie_word_embeddings and evals is not None:
        head = {**head, "embed_tokens": source.embed()}
    ppl = (None, None) if evals is None else tuple(
        _perplexity(head, a, eval_windows, eval_batch_size, config) for a in evals)
    return counts.report(), *ppl
