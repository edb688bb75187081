"""The optimizer: AdamW, linear warmup then cosine decay, global-norm clipping; for sparse
training the whole chain is wrapped in keep-sparse (`optim/keep_sparse.py`).

Weight decay is applied to every matrix, embeddings and `lm_head` included (as GPT-2/nanoGPT,
the Hugging Face Trainer and MaxText do), and never to the RMSNorm scales: decaying a norm scale
pulls it towards zero, which only shrinks the residual stream, and the norms hold a negligible
share of the parameters. Norms are recognised by name ("norm" in the last path component), not
by rank, because stacked layer norms are (L, D) matrices.

Gradient accumulation is not an optax wrapper here: `train/step.py` sums the micro-batch
gradients inside one jitted step, so one optimizer update is one `TrainState.step` and the
schedule, checkpoints and data order all count the same thing.
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jaxtyping import Array, Float, Int

from sparse_llama.ground.tree_paths import path_name
from sparse_llama.optim.keep_sparse import keep_sparse

OptimizerConfig = ml_collections.ConfigDict | Mapping


def learning_rate_schedule(opt_cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """`lr * (step + 1) / warmup` for the first `warmup_steps` updates, then cosine to
    `lr * min_lr_ratio` at `total_steps`, flat after that.

    Warmup starts at `lr / warmup` rather than 0 so that the first update is not wasted.
    """
    peak = float(opt_cfg["lr"])
    warmup = int(opt_cfg["warmup_steps"])
    floor = float(opt_cfg["min_lr_ratio"])
    decay_steps = max(1, int(total_steps) - warmup)

    def schedule(step: Int[Array, ""] | int) -> Float[Array, ""]:
        step = jnp.asarray(step, jnp.float32)
        warm = peak * jnp.minimum(1.0, (step + 1.0) / max(1, warmup))
        progress = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
        cosine = peak * (floor + (1.0 - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress)))
        return jnp.where(step < warmup, warm, cosine)

    return schedule


def weight_decay_mask(params) -> dict:
    """True for the leaves AdamW decays: everything except the norm scales."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "norm" not in path_name(path).rsplit("/", 1)[-1], params)


def make_optimizer(opt_cfg: OptimizerConfig, total_steps: int, *, sparse: bool = False
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer and its learning-rate schedule (the step reports the lr it used).

    `sparse`: the whole chain is wrapped in `keep_sparse` (optim/keep_sparse.py), whose masks
    prune exactly the zeros of the targeted tensors of the params given to `init` (or the masks
    put in with `keep_sparse.set_masks`): clipping sees only the kept weights' gradients, and
    the pruned weights and their moments stay exactly 0.
    """
    schedule = learning_rate_schedule(opt_cfg, total_steps)
    transforms = []
    if float(opt_cfg["clip_norm"]) > 0:
        transforms.append(optax.clip_by_global_norm(float(opt_cfg["clip_norm"])))
    transforms.append(optax.adamw(
        schedule, b1=float(opt_cfg["b1"]), b2=float(opt_cfg["b2"]), eps=float(opt_cfg["eps"]),
        weight_decay=float(opt_cfg["weight_decay"]), mask=weight_decay_mask))
    optimizer = optax.chain(*transforms)
    if sparse:
        optimizer = keep_sparse(optimizer)
    return optimizer, schedule
