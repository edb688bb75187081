"""Autoregressive generation with the KV cache of `llama.forward_cached`.

The prompt is prefilled in one call, then tokens are produced one per step inside a jitted
`lax.while_loop` that stops as soon as every row has emitted an end-of-sequence token. Greedy
when temperature == 0, nucleus (top-p) sampling otherwise.

Limitation: all prompts of a batch must have the same length, because `forward_cached` places
every row at the same positions (left padding would need per-row positions and a padding mask).
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from sparse_llama.model import llama
from sparse_llama.model.config import LlamaConfig


def sample_token(logits: Float[Array, "b v"], key: Array, temperature: Float[Array, ""],
                 top_p: Float[Array, ""]) -> Int[Array, " b"]:
    """Nucleus sampling: draw from the smallest set of most likely tokens whose probability
    reaches top_p (the most likely token is always kept), at the given temperature."""
    logits = logits.astype(jnp.float32) / temperature
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Mass strictly before each token: a token is kept while that mass is still below top_p.
    before = jnp.cumsum(probs, axis=-1) - probs
    keep = before < top_p
    keep = keep.at[:, 0].set(True)
    choice = jax.random.categorical(key, jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def _next_token(logits, key, temperature, top_p, greedy: bool):
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return sample_token(logits, key, temperature, top_p)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "greedy"))
def _generate(params: dict, prompt: Int[Array, "b t"], config: LlamaConfig, key: Array,
              temperature: Float[Array, ""], top_p: Float[Array, ""], eos: Int[Array, " n"],
              pad: Int[Array, ""], max_new_tokens: int, greedy: bool,
              soft_prompt: Float[Array, "p d"] | None = None
              ) -> tuple[Int[Array, "b m"], Int[Array, " b"]]:
    b, t = prompt.shape
    n = 0 if soft_prompt is None else soft_prompt.shape[0]
    cache = llama.init_cache(config, b, n + t + max_new_tokens)
    if soft_prompt is not None:  # its rows hold positions 0..n-1, before the prompt's tokens
        rows = jnp.broadcast_to(soft_prompt.astype(config.dtype), (b, *soft_prompt.shape))
        _, cache = llama.forward_cached_embeds(params, rows, config, cache, jnp.int32(0))
    t = n + t  # positions taken so far
    logits, cache = llama.forward_cached(params, prompt, config, cache, jnp.int32(n))
    first = _next_token(logits[:, -1], jax.random.fold_in(key, 0), temperature, top_p, greedy)
    out = jnp.full((b, max_new_tokens), pad, jnp.int32)
    done = jnp.zeros((b,), jnp.bool_)
    lengths = jnp.full((b,), max_new_tokens, jnp.int32)

    def cond(state):
        i, _, _, _, done, _ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, token, cache, out, done, lengths = state
        # Rows that already stopped keep writing padding (their compute is wasted, not wrong).
        out = out.at[:, i].set(jnp.where(done, pad, token))
        hit = ~done & jnp.isin(token, eos)
        lengths = jnp.where(hit, i + 1, lengths)
        done = done | hit
        logits, cache = llama.forward_cached(params, token[:, None], config, cache, t + i)
        token = _next_token(logits[:, -1], jax.random.fold_in(key, i + 1), temperature, top_p,
                            greedy)
        return i + 1, token, cache, out, done, lengths

    state = (jnp.int32(0), first, cache, out, done, lengths)
    _, _, _, out, _, lengths = jax.lax.while_loop(cond, body, state)
    return out, lengths


def _eos_ids(eos_id, config: LlamaConfig) -> list[int]:
    if eos_id is None:
        eos_id = config.eos_token_id
    if eos_id is None:
        return []
    return [int(eos_id)] if isinstance(eos_id, int | np.integer) else [int(e) for e in eos_id]


def generate(params: dict, config: LlamaConfig,
             prompt_tokens: Sequence[int] | Sequence[Sequence[int]] | np.ndarray | Array,
             *, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0, eos_id: int | Sequence[int] | None = None,
             pad_id: int | None = None, return_lengths: bool = False,
             soft_prompt: Float[Array, "p d"] | None = None):
    """Continue the prompt(s) by up to `max_new_tokens` tokens.

    prompt_tokens: one prompt (list of ints) or a batch (b, t) of prompts of equal length.
    temperature: 0 is greedy (argmax); otherwise logits / temperature are sampled with
      nucleus top_p. The draws depend only on `seed` (and the shapes).
    eos_id: a token id or several; a row stops after emitting one (it is included in the
      output). None uses `config.eos_token_id`; an empty list never stops early.
    pad_id: fills a row after it stopped (default: its first eos id, else 0).
    soft_prompt: (N, hidden_size) embeddings placed before the prompt (model/soft_prompt.py),
      as if they were N tokens at positions 0..N-1.
    Returns, for a list prompt, the list of new tokens (up to and including the EOS); for a
    batch, an int32 numpy array (b, max_new_tokens), padded after each row's stop, and with
    `return_lengths` also the number of valid tokens of each row (b,).
    The cache holds prompt + max_new_tokens positions, which must fit max_position_embeddings.
    """
    single = isinstance(prompt_tokens, list | tuple) and (
        not prompt_tokens or not isinstance(prompt_tokens[0], list | tuple | np.ndarray))
    if isinstance(prompt_tokens, list | tuple) and not single:
        lengths = {len(p) for p in prompt_tokens}
        if len(lengths) > 1:
            raise ValueError(f"prompts of a batch must have equal lengths, got {sorted(lengths)}"
                             "; generate them separately or in groups of equal length")
    prompt = np.asarray([prompt_tokens] if single else prompt_tokens, dtype=np.int32)
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt_tokens must be a non-empty list of ids or a (b, t) batch, got "
                         f"shape {prompt.shape}")
    if prompt.min() < 0 or prompt.max() >= config.vocab_size:
        raise ValueError(f"prompt token ids must be in [0, {config.vocab_size}), got "
                         f"[{prompt.min()}, {prompt.max()}]")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    n = 0 if soft_prompt is None else soft_prompt.shape[0]
    total = n + prompt.shape[1] + max_new_tokens
    if total > config.max_position_embeddings:
        soft = f"soft prompt {n} + " if n else ""
        raise ValueError(f"{soft}prompt length {prompt.shape[1]} + max_new_tokens "
                         f"{max_new_tokens} = {total} exceeds max_position_embeddings "
                         f"({config.max_position_embeddings})")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got temperature "
                         f"{temperature}, top_p {top_p}")
    eos = _eos_ids(eos_id, config)
    pad = pad_id if pad_id is not None else (eos[0] if eos else 0)
    out, lengths = _generate(
        params, jnp.asarray(prompt), config, jax.random.key(seed),
        jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p),
        jnp.asarray(eos if eos else [-1], jnp.int32), jnp.int32(pad),
        max_new_tokens=max_new_tokens, greedy=temperature == 0,
        soft_prompt=None if soft_prompt is None else jnp.asarray(soft_prompt, jnp.float32))
    out, lengths = np.asarray(out), np.asarray(lengths)
    if single:
        return out[0, :lengths[0]].tolist()
    return (out, lengths) if return_lengths else out

