"""Soft prompts (MediSwift's prompt tuning): N learned embeddings in front of every input.

The model stays frozen; only the prompt P (N, D) trains. For a packed row the prompt stands
before every document of the row: each token attends to its own document (causally, as in
llama.forward) and to all N prompt positions, and a document's rotary positions are shifted by
N (the prompt holds positions 0..N-1, as if it were written right before the document). With
the prompt equal to the embeddings of N real tokens, the logits are exactly those of the model
on those N tokens followed by the row (tested).

Init: the embeddings of a given text's tokens (tiled or cut to N) or N random vocabulary rows.
On disk: one safetensors file holding `soft_prompt` (N, D), its width in the metadata; loading
it for a model of another width is refused.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from sparse_llama.model import layers, llama
from sparse_llama.model.config import LlamaConfig
from sparse_llama.model.loss import token_nll

TENSOR = "soft_prompt"


def init_from_text(params: dict, token_ids, num_tokens: int) -> Float[Array, "n d"]:
    """The embeddings of `token_ids`, tiled or cut to `num_tokens` rows (float32)."""
    ids = np.asarray(token_ids, np.int64)
    if num_tokens < 1 or not len(ids):
        raise ValueError("a soft prompt needs num_tokens >= 1 and a non-empty init text")
    ids = np.resize(ids, num_tokens)
    return jnp.take(params["embed_tokens"], jnp.asarray(ids), axis=0).astype(jnp.float32)


def init_from_vocab(key: jax.Array, params: dict, num_tokens: int) -> Float[Array, "n d"]:
    """`num_tokens` distinct random rows of the embedding (float32)."""
    vocab = params["embed_tokens"].shape[0]
    ids = jax.random.choice(key, vocab, (num_tokens,), replace=num_tokens > vocab)
    return jnp.take(params["embed_tokens"], ids, axis=0).astype(jnp.float32)


def check_width(prompt_shape, config: LlamaConfig, source: str = "the soft prompt") -> None:
    """ValueError unless the prompt is (N, hidden_size)."""
    if len(prompt_shape) != 2 or prompt_shape[1] != config.hidden_size:
        raise ValueError(f"{source} has shape {tuple(prompt_shape)} but this model's hidden "
                         f"size is {config.hidden_size}: a soft prompt only fits the model "
                         "(width) it was trained for; train one for this model")


def _prompt_mask(n: int, segment_ids: Int[Array, "b t"]):
    """(b, n + t, n + t): prompt rows see the prompt causally; token rows see the whole
    prompt and, causally, their own segment (segment 0 = padding is never a key)."""
    b, t = segment_ids.shape
    seg = jnp.concatenate([jnp.full((b, n), -1, segment_ids.dtype), segment_ids], axis=1)
    idx = jnp.arange(n + t)
    causal = idx[None, :] <= idx[:, None]
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0)
    to_prompt = jnp.broadcast_to(idx[None, None, :] < n, (b, n + t, n + t))
    return causal[None] & (same | to_prompt)


def forward(params: dict, prompt: Float[Array, "n d"], tokens: Int[Array, "b t"],
            config: LlamaConfig, *, positions: Int[Array, "b t"] | None = None,
            segment_ids: Int[Array, "b t"] | None = None) -> Float[Array, "b t v"]:
    """Logits (float32) of `tokens` with `prompt` before every document of each row."""
    b, t = tokens.shape
    n = prompt.shape[0]
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if segment_ids is None:
        segment_ids = jnp.ones((b, t), jnp.int32)
    x = jnp.concatenate([jnp.broadcast_to(prompt.astype(config.dtype), (b, n, prompt.shape[1])),
                         llama.embed(params, tokens, config)], axis=1)
    pos = jnp.concatenate([jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n)),
                           positions + n], axis=1)
    cos, sin, _ = llama.rope_and_mask((b, n + t), config, pos)
    mask = _prompt_mask(n, segment_ids)

    def step(p, h, _):
        h, _ = llama.block(p, h, cos, sin, mask, config)
        return h, None

    h, _ = llama.run_blocks(params["layers"], x, None, step, config)
    h = layers.rms_norm(h[:, n:], params["norm"], config.rms_norm_eps)
    return jnp.dot(h, llama.output_weights(params).astype(h.dtype),
                   preferred_element_type=jnp.float32)


def soft_prompt_loss(model: LlamaConfig):
    """`loss(trainable, batch, rng, base_params, step_args)` of an Objective: masked
    next-token NLL with `trainable["soft_prompt"]` in front; the model is a frozen input and
    the prompt the only trainable array."""
    def loss(trainable, batch, rng, base, step_args):
        del rng, step_args
        base = jax.lax.stop_gradient(base)
        logits = forward(base, trainable[TENSOR], batch["inputs"], model,
                         positions=batch["positions"],
                         segment_ids=batch["segment_ids"])
        w = batch["loss_mask"].astype(jnp.float32)
        nll = token_nll(logits, batch["targets"])
        return jnp.sum(jnp.where(w > 0, nll * w, 0.0)), jnp.sum(w), {}
    return loss


def save(prompt, path: str | os.PathLike) -> str:
    """Write the prompt as one safetensors file."""
    from safetensors.numpy import save_file

    prompt = np.asarray(prompt, np.float32)
    save_file({TENSOR: prompt}, os.fspath(path),
              metadata={"num_tokens": str(prompt.shape[0]), "hidden_size": str(prompt.shape[1])})
    return os.fspath(path)


def load(path: str | os.PathLike, config: LlamaConfig) -> Float[Array, "n d"]:
    """A saved prompt, checked against the model's width."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(os.fspath(path), framework="numpy") as f:
            if TENSOR not in f.keys():
                raise ValueError(f"{path} holds no {TENSOR!r} tensor; is it a soft prompt file?")
            prompt = f.get_tensor(TENSOR)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"cannot read soft prompt {path}: {e}") from e
    check_width(prompt.shape, config, f"soft prompt {path}")
    return jnp.asarray(prompt, jnp.float32)


def from_model_section(model_cfg, config: LlamaConfig) -> Float[Array, "n d"] | None:
    """The prompt `model.soft_prompt` names (checked against the model), or None when unset:
    how `launch.eval` and `launch.generate` take `--config.model.soft_prompt=FILE`."""
    path = model_cfg.get("soft_prompt") or ""
    if not path:
        return None
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model.soft_prompt={path!r} is not a file; pass the "
                                "soft_prompt.safetensors a configs/soft_prompt.py run wrote")
    return load(path, config)
