"""Assembling a training run from its config: the tokenizer, the model it trains, the
optimizer (AdamW, keep-sparse when the run keeps a mask, the objective's own transformation)
and the state at step 0. The loop (train/loop.py), the objectives that need the run's
tokenizer (distillation, soft prompts) and the planner (commands/plan.py) all assemble a run
through these functions, so a planned step is the step that runs.
"""

import os

import ml_collections

from sparse_llama import loading
from sparse_llama.data.tokenizer import check_vocab, default_tokenizer, load_tokenizer
from sparse_llama.model.config import LlamaConfig, check_context, preset
from sparse_llama.optim.factory import make_optimizer
from sparse_llama.train import sparse_start
from sparse_llama.train import state as state_lib
from sparse_llama.train.objective import Objective, Trainable


def resolve_tokenizer(config: ml_collections.ConfigDict):
    """(tokenizer, the directory its files come from or None).

    data.tokenizer_path, else the Hugging Face model's own tokenizer, else the embedded BPE
    with the preset's vocabulary size (or data.tokenizer_vocab_size).
    """
    if config.data.tokenizer_path:
        path = config.data.tokenizer_path
        return load_tokenizer(path), (path if os.path.isdir(path) else None)
    if config.model.hf_path:
        if not os.path.isfile(os.path.join(config.model.hf_path, "tokenizer.json")):
            raise ValueError(f"model.hf_path={config.model.hf_path!r} has no tokenizer.json; "
                             "set data.tokenizer_path to the model's tokenizer")
        return load_tokenizer(config.model.hf_path), config.model.hf_path
    return default_tokenizer(vocab_size=_embedded_vocab_size(config)), None


def _embedded_vocab_size(config: ml_collections.ConfigDict) -> int:
    return config.data.get("tokenizer_vocab_size") or preset(config.model.preset).vocab_size


def planned_model(config: ml_collections.ConfigDict) -> LlamaConfig:
    """The shapes of the model the run trains, without a tokenizer or weights (the planner:
    config.json of `model.hf_path`, or the preset with the vocabulary its tokenizer gets)."""
    if config.model.hf_path:
        return loading.model_config(config.model)
    return loading.model_config(config.model, vocab_size=_embedded_vocab_size(config))


def resolve_model_config(config: ml_collections.ConfigDict, tokenizer) -> LlamaConfig:
    """The model this run trains; a preset trained from scratch takes the tokenizer's vocab."""
    if config.model.hf_path:
        model = loading.model_config(config.model)
    else:
        # A model trained from scratch speaks its tokenizer's special ids: the export's
        # config.json and generation_config.json must name them (not the preset's).
        model = loading.model_config(config.model, vocab_size=tokenizer.vocab_size).replace(
            bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
    check_vocab(tokenizer, model.vocab_size)
    check_context(config.data.seq_len, model)
    return model


def run_optimizer(config: ml_collections.ConfigDict, objective: Objective):
    """(optimizer, schedule) of a run: AdamW from `optimizer.*`, wrapped in keep-sparse when
    the run keeps a mask, then in whatever the objective adds. Restoring a checkpoint builds
    the same, so its optimizer state has the same structure. Adapters (LoRA, a soft prompt)
    are never wrapped in keep-sparse: the frozen model's mask is kept where they apply."""
    sparse = sparse_start.keeps_mask(config) and objective.trainable is None
    optimizer, schedule = make_optimizer(config.optimizer, config.train.steps, sparse=sparse)
    return objective.transform(optimizer), schedule


def initial_state(config, model, optimizer, mesh, rules, param_dtype,
                   trainable: Trainable | None) -> state_lib.TrainState:
    """Step 0: a preset initialised in place, or a Hugging Face directory's weights; with the
    masks the run keeps (sparse_start.py). Or the objective's adapters (the model is frozen)."""
    seed = config.train.seed
    if trainable is not None:
        return state_lib.init_trainable_state(trainable.init, optimizer, mesh, seed=seed)
    if config.model.hf_path:
        bundle = loading.load_model(config.model)
        masks = sparse_start.loaded_masks(config, bundle.params)
        state = state_lib.state_from_params(bundle.params, optimizer, mesh, rules, seed=seed,
                                            param_dtype=param_dtype, masks=masks)
        del bundle
    else:
        state = state_lib.init_state(model, optimizer, mesh, rules, seed=seed,
                                     param_dtype=param_dtype)
    mask_fn = sparse_start.static_mask_fn(config)
    if mask_fn is not None:
        state = state_lib.masked_state(state, optimizer, seed=seed, mask_fn=mask_fn)
    return state
