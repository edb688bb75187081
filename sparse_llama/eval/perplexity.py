"""Wikitext-style perplexity (docs/algorithms.md, "Perplexity protocol").

The whole text is tokenized once (no BOS inserted), cut into non-overlapping windows of
`seq_len` tokens (the incomplete tail is dropped), and the mean next-token NLL over every
predicted token of every window is exponentiated. Each window predicts `seq_len - 1` tokens.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jaxtyping import Array, Float, Int

from sparse_llama.model import llama, sharding, soft_prompt
from sparse_llama.model.config import LlamaConfig, check_context
from sparse_llama.model.loss import token_nll
from sparse_llama.sparsity.masks import apply_masks


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # predicted tokens
    windows: int


def token_windows(token_ids, seq_len: int) -> np.ndarray:
    """Non-overlapping (n, seq_len) windows of a 1-D token stream; the tail is dropped."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 to predict anything, got {seq_len}")
    token_ids = np.asarray(token_ids, np.int32)
    n = token_ids.shape[0] // seq_len
    if n == 0:
        raise ValueError(f"the evaluation text has {token_ids.shape[0]} tokens, fewer than one "
                         f"window of seq_len={seq_len}; use a longer text or a smaller seq_len")
    return token_ids[: n * seq_len].reshape(n, seq_len)


def window_nll(params: dict, windows: Int[Array, "b t"], weights: Float[Array, " b"],
               config: LlamaConfig, masks=None,
               prompt: Float[Array, "n d"] | None = None) -> Float[Array, ""]:
    """Sum over windows (weighted 0/1, for padding) of the summed next-token NLL; with a
    soft `prompt` in front of every window (model/soft_prompt.py)."""
    if prompt is None:
        logits = llama.forward(params, windows, config, masks)[:, :-1]
    else:
        if masks is not None:
            params = apply_masks(params, masks)
        logits = soft_prompt.forward(params, prompt, windows, config)[:, :-1]
    nll = token_nll(logits, windows[:, 1:])
    return jnp.sum(nll.sum(axis=-1) * weights)


@functools.partial(jax.jit, static_argnames=("config",))
def _window_nll_jit(params, windows, weights, config, masks, prompt):
    return window_nll(params, windows, weights, config, masks, prompt)


def check_token_ids(windows: np.ndarray, vocab_size: int) -> None:
    """ValueError when a window holds an id outside the embedding (`jnp.take` would give NaN)."""
    if windows.size and (windows.min() < 0 or windows.max() >= vocab_size):
        raise ValueError(f"the evaluation tokens span ids [{windows.min()}, {windows.max()}] but "
                         f"the model's embedding has {vocab_size} rows: the tokenizer does not "
                         "belong to this model")


def evaluate_windows(params: dict, config: LlamaConfig, windows: np.ndarray, *,
                     batch_size: int = 8, masks=None, mesh: Mesh | None = None,
                     rules: dict | None = None, progress=None,
                     prompt: Float[Array, "n d"] | None = None) -> PerplexityResult:
    """Perplexity of the model over `windows` (n, seq_len), batched; exact at any batch size.

    With a mesh, batches are sharded over the rule for 'batch' (padded with zero-weight
    windows to a multiple of the batch size); params are expected to be placed already.
    `prompt`: a soft prompt before every window (its positions are not scored).
    Raises ValueError for ids outside the vocabulary and for a non-finite NLL (the model's
    logits are not finite), so a perplexity is always a finite number.
    """
    check_context(windows.shape[1] + (0 if prompt is None else prompt.shape[0]), config)
    check_token_ids(windows, config.vocab_size)
    n = windows.shape[0]
    padded = math.ceil(n / batch_size) * batch_size
    all_windows = np.zeros((padded, windows.shape[1]), np.int32)
    all_windows[:n] = windows
    all_weights = (np.arange(padded) < n).astype(np.float32)
    place = (lambda x: x) if mesh is None else functools.partial(
        _put_batch, mesh=mesh, rules=rules or {})
    total = 0.0
    for start in range(0, padded, batch_size):
        sl = slice(start, start + batch_size)
        total += float(_window_nll_jit(params, place(all_windows[sl]), place(all_weights[sl]),
                                       config, masks, prompt))
        if progress is not None:
            progress(min(start + batch_size, n), n)
    tokens = n * (windows.shape[1] - 1)
    nll = total / tokens
    if not math.isfinite(nll):
        raise ValueError(f"the mean NLL over {n} windows is {nll}: the model's logits are not "
                         f"finite (NaN or infinite weights, or overflow in {config.dtype})")
    return PerplexityResult(perplexity=perplexity_of(nll), nll=nll, tokens=tokens, windows=n)


def perplexity_of(nll: float) -> float:
    """exp(mean NLL). math.exp raises OverflowError past ~709.78; inf is the honest value (a
    command's summary then refuses it by name, or reports null)."""
    return math.exp(nll) if nll < 709.0 else math.inf


def _put_batch(x: np.ndarray, *, mesh: Mesh, rules: dict):
    return jax.device_put(x, sharding.batch_sharding(mesh, rules, ndim=x.ndim))
