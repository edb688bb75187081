"""Objectives that train small arrays in front of, or beside, a frozen model.

- **Mask-preserving LoRA** (`finetune.lora_rank > 0`, configs/finetune.py): wraps the run's
  objective (`lm` or `distill`) so that it trains adapters `{"a", "b"}` of every target linear
  (model/lora.py); the objective sees the merged params `W + scale * (a @ b) * mask`, so the
  model it trains is always exactly as sparse as the frozen base, whatever `sparsity.keep`
  says: the mask is the base's (`sparsity.masks_path`, its `masks/`, else its exact zeros;
  `sparse_start.frozen_masks`). `sparsity.keep=True` refuses a dense base
  (`sparse_start.SPARSE_CHECKPOINT_MIN`); with `sparsity.keep=False` a dense base is adapted
  densely. `sparsity.init` is refused: a static mask is never applied to a frozen model
  (prune it first). The end of the run writes `<workdir>/hf` (merged; with `masks/` and the
  sparsity report when the base is sparse) and `<workdir>/adapters.safetensors` (the adapters
  alone).
- **Soft prompt** (`train.objective="soft_prompt"`, configs/soft_prompt.py): N embeddings
  before every input (model/soft_prompt.py), the only trained array; the run writes
  `<workdir>/soft_prompt.safetensors`, which `launch.eval` / `launch.generate` take as
  `--config.model.soft_prompt=FILE`.

In both, the frozen model (and its masks) is an *input* of the jitted step, sharded by the
params' logical rules; the trained arrays are the state's params, replicated (they are small).
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from sparse_llama import loading
from sparse_llama.ground import publish
from sparse_llama.ground.sections import spec_from_section
from sparse_llama.model import llama, lora, sharding
from sparse_llama.model import soft_prompt as prompts
from sparse_llama.model.config import LlamaConfig
from sparse_llama.model.loss import lm_loss
from sparse_llama.train import export, sparse_start
from sparse_llama.train.objective import Objective, Trainable
from sparse_llama.train.run_setup import resolve_tokenizer

ADAPTERS_FILE = "adapters.safetensors"
SOFT_PROMPT_FILE = "soft_prompt.safetensors"


@dataclasses.dataclass(frozen=True)
class LoraSection:
    """`finetune` (defaults: configs/blocks.py `finetune()`)."""

    lora_rank: int
    lora_alpha: float


@dataclasses.dataclass(frozen=True)
class SoftPromptSection:
    """`soft_prompt` (defaults: configs/blocks.py `soft_prompt()`)."""

    num_tokens: int
    init_text: str


def _require_model(config: ml_collections.ConfigDict, what: str) -> None:
    if not config.model.get("hf_path"):
        raise ValueError(f"{what} adapts a trained model: set --config.model.hf_path=DIR (a "
                         "Hugging Face Llama directory, e.g. a launch.prune output)")


def lora_settings(config: ml_collections.ConfigDict, model: LlamaConfig
                  ) -> tuple[int, float] | None:
    """(rank, alpha) when the run trains LoRA adapters, else None; ValueError for bad keys,
    before any weight is loaded. (Which objectives LoRA may wrap is a property of their
    registration, sparse_llama/objectives.py: SAT changes the trained units every step, a soft
    prompt has its own trained array.)"""
    if config.get("finetune") is None:
        return None  # a run without the section trains no adapters
    f = spec_from_section(LoraSection, config.finetune, "finetune")
    rank, alpha = f.lora_rank, f.lora_alpha
    if rank == 0:
        return None
    _require_model(config, "finetune.lora_rank")
    init = (config.get("sparsity") or {}).get("init", "")
    if init:
        raise ValueError(f"sparsity.init={init!r} with finetune.lora_rank={rank}: LoRA adapts "
                         "a frozen model and keeps its own mask, so a static mask would never "
                         "be applied; prune the model first (python -m launch.prune) and adapt "
                         "that directory, or drop sparsity.init")
    shapes = jax.eval_shape(lambda: llama.init_params(jax.random.key(0), model))
    lora.check_rank(shapes, rank)
    if alpha < 0:
        raise ValueError(f"finetune.lora_alpha must be a number >= 0 (0 = the rank), got "
                         f"{alpha!r}")
    return rank, float(alpha or rank)


def _frozen(config: ml_collections.ConfigDict, mesh: Mesh, rules, *, with_masks: bool):
    """(params, their shardings, masks or None, their shardings) of `model.hf_path`, placed by
    the params' rules: the frozen model of an adapter run."""
    bundle = loading.load_model(config.model)
    masks = sparse_start.frozen_masks(config, bundle.params) if with_masks else None
    param_sh = sharding.param_shardings(bundle.params, mesh, rules)
    params = sharding.shard(bundle.params, param_sh)
    mask_sh = None
    if masks is not None:
        mask_sh = sharding.param_shardings(masks, mesh, rules)
        masks = sharding.shard(masks, mask_sh)
    return params, param_sh, masks, mask_sh


def lora_loss(inner_loss, scale: float):
    """`loss(adapters, batch, rng, (base, masks, inner_inputs), step_args)`: `inner_loss` of
    the merged params; the base and its masks are frozen (stop_gradient), so only the adapters
    get gradients."""
    def loss(adapters, batch, rng, inputs, step_args):
        return inner_loss(_merged(adapters, inputs, scale), batch, rng, inputs[2], step_args)
    return loss


def _merged(adapters, inputs, scale: float):
    params, masks, _ = jax.lax.stop_gradient(inputs)
    return lora.merge(params, adapters, masks, scale)


def lora_objective(inner: Objective, config: ml_collections.ConfigDict, model: LlamaConfig,
                   mesh: Mesh, rules, rank: int, alpha: float) -> Objective:
    """`inner` (lm or distill) trained through mask-preserving LoRA adapters of the frozen
    `model.hf_path`: inputs are `(base params, masks or None, inner's inputs)`."""
    scale = alpha / rank
    base, base_sh, masks, mask_sh = _frozen(config, mesh, rules, with_masks=True)
    shapes = jax.eval_shape(lambda: base)

    def prepare(adapters, batch, rng, inputs):
        return inner.prepare(_merged(adapters, inputs, scale), batch, rng, inputs[2])

    def eval_loss(adapters, batch, inputs):
        return lm_loss(_merged(adapters, inputs, scale), batch, model)

    def write(host_adapters, inputs, workdir, tokenizer_dir):
        params, m, _ = inputs
        adapted = jax.jit(lambda p, a, mk: lora.merge(p, a, mk, scale))(params, host_adapters, m)
        hf_dir, report = export.export_run(adapted, m, model, os.path.join(workdir, "hf"),
                                           tokenizer_dir=tokenizer_dir)
        out = {"hf_dir": hf_dir, "sparsity_report": report}
        if jax.process_index() == 0:
            path = publish.write_file(os.path.join(workdir, ADAPTERS_FILE), lambda tmp:
                                      lora.save_adapters(host_adapters, tmp, rank=rank,
                                                         alpha=alpha))
            out["adapters"] = os.path.abspath(path)
        return out

    logging.warning("LoRA: rank %d, alpha %g on the frozen %s%s", rank, alpha,
                    config.model.hf_path, " (merge keeps its masks)" if masks is not None else "")
    return inner._replace(
        loss=lora_loss(inner.loss, scale), prepare=prepare, inputs=(base, masks, inner.inputs),
        input_shardings=(base_sh, mask_sh, inner.input_shardings),
        trainable=Trainable(init=lambda key: lora.init_adapters(key, shapes, rank),
                            eval_loss=eval_loss, export=write))


def check_soft_prompt_config(config: ml_collections.ConfigDict,
                             model: LlamaConfig | None = None) -> SoftPromptSection:
    """The validated `soft_prompt` section (ValueError naming the key and the fix); with the
    `model` it prompts, also that the prompt and a window fit its positions."""
    s = spec_from_section(SoftPromptSection, config.get("soft_prompt"), "soft_prompt",
                          home="blocks.soft_prompt()")
    n = s.num_tokens
    if n < 1:  # (the spec checked the types)
        raise ValueError(f"soft_prompt.num_tokens must be a positive integer, got {n!r}")
    if model is not None and n + config.data.seq_len > model.max_position_embeddings:
        raise ValueError(f"soft_prompt.num_tokens={n} + data.seq_len={config.data.seq_len} "
                         f"exceeds the model's max_position_embeddings "
                         f"({model.max_position_embeddings}); shorten one of them")
    return s


def soft_prompt_objective(config: ml_collections.ConfigDict, model: LlamaConfig, mesh: Mesh,
                          rules) -> Objective:
    """`train.objective="soft_prompt"`: the prompt is the only trained array; inputs are the
    frozen model's params."""
    _require_model(config, "a soft prompt")
    s = check_soft_prompt_config(config, model)
    base, base_sh, _, _ = _frozen(config, mesh, rules, with_masks=False)
    n = s.num_tokens
    if s.init_text:
        ids = resolve_tokenizer(config)[0].encode(s.init_text)
        first = prompts.init_from_text(base, ids, n)
    else:
        key = jax.random.fold_in(jax.random.key(config.train.seed), 11)
        first = prompts.init_from_vocab(key, base, n)
    # The initial prompt is (N, D): small enough to be the init's constant.
    first = np.asarray(jax.device_get(first), np.float32)
    full_loss = prompts.soft_prompt_loss(model)

    def eval_loss(trainable, batch, inputs):
        total, count, _ = full_loss(trainable, batch, None, inputs, {})
        return total, count

    def write(host, inputs, workdir, tokenizer_dir):
        del inputs, tokenizer_dir
        if jax.process_index() != 0:
            return {}
        path = publish.write_file(os.path.join(workdir, SOFT_PROMPT_FILE),
                                  lambda tmp: prompts.save(host[prompts.TENSOR], tmp))
        return {"soft_prompt": os.path.abspath(path)}

    return Objective(loss=full_loss, inputs=base, input_shardings=base_sh,
                     trainable=Trainable(init=lambda key: {prompts.TENSOR: jnp.asarray(first)},
                                         eval_loss=eval_loss, export=write))
