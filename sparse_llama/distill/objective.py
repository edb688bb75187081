"""The distillation objective: a sparse student learns from a frozen dense teacher.

    loss = ce_weight * CE + kd_weight * KD + layer_weight * SquareHead      (docs/distill.md)

Config section `distill` (configs/finetune_distill.py):

    teacher_path   a Hugging Face Llama directory: same vocabulary and tokenizer as the student
    teacher_dtype  "" (the student's compute dtype) | float32 | bfloat16 | float16: the
                   teacher's storage and compute dtype (bf16 halves its memory)
    ce_weight, kd_weight, layer_weight   the three terms' weights (>= 0, one of them > 0)
    temperature    tau of the logit KD (> 0)

The teacher's params are an *input* of the jitted step (`Objective.inputs`), sharded by the
student's own logical rules, never trained and never closed over; the loss runs its forward
inside every micro-batch under `stop_gradient`, so at most one micro-batch of its
full-vocabulary logits is ever live. A term of weight 0 is not computed at all (so a
non-finite one cannot reach the loss): with `kd_weight=0` there is no KD term, and with
`kd_weight=0` and `layer_weight=0` the teacher is neither loaded nor run (CE alone). The
student's mask is kept by the optimizer (`sparsity.keep`), not here.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from jax.sharding import Mesh

from sparse_llama import loading
from sparse_llama.data.tokenizer import load_tokenizer
from sparse_llama.distill.losses import kd_sums, squarehead
from sparse_llama.ground.sections import spec_from_section
from sparse_llama.model import hf_io, llama, sharding
from sparse_llama.model.config import DTYPES, LlamaConfig
from sparse_llama.model.loss import token_nll
from sparse_llama.train.objective import Objective
from sparse_llama.train.run_setup import resolve_tokenizer


@dataclasses.dataclass(frozen=True)
class DistillSection:
    """`distill` (defaults: configs/blocks.py `distill()`)."""

    teacher_path: str
    teacher_dtype: str
    ce_weight: float
    kd_weight: float
    layer_weight: float
    temperature: float


def check_distill_config(config: ml_collections.ConfigDict) -> DistillSection:
    """The validated `distill` section; ValueError naming the key and the fix otherwise."""
    if config.get("distill") is None:
        raise ValueError("train.objective='distill' needs a distill section; use "
                         "configs/finetune_distill.py or add config.distill = "
                         "configs.blocks.distill(teacher_path=DIR)")
    d = spec_from_section(DistillSection, config.distill, "distill")
    if not d.teacher_path:
        raise ValueError("distill.teacher_path is empty; pass --config.distill.teacher_path=DIR "
                         "(the dense teacher, a Hugging Face Llama directory)")
    if not os.path.isfile(os.path.join(d.teacher_path, "config.json")):
        raise FileNotFoundError(f"distill.teacher_path={d.teacher_path!r} holds no config.json; "
                                "point it at a Hugging Face Llama directory")
    if d.teacher_dtype and d.teacher_dtype not in DTYPES:
        raise ValueError(f"distill.teacher_dtype={d.teacher_dtype!r} is not one of "
                         f"{('', *DTYPES)}")
    weights = {k: getattr(d, k) for k in ("ce_weight", "kd_weight", "layer_weight")}
    for key, value in weights.items():
        if value < 0:
            raise ValueError(f"distill.{key} must be a number >= 0, got {value!r}")
    if not any(weights.values()):
        raise ValueError("distill.ce_weight, kd_weight and layer_weight are all 0: nothing to "
                         "train; set at least one of them > 0")
    if not d.temperature > 0:
        raise ValueError(f"distill.temperature must be > 0, got {d.temperature!r}")
    return d


def check_teacher(student: LlamaConfig, teacher: LlamaConfig, *, layer_weight: float,
                  path: str = "the teacher") -> None:
    """ValueError when the teacher cannot teach this student (vocabulary; with SquareHead also
    the number and width of the decoder blocks)."""
    if teacher.vocab_size != student.vocab_size:
        raise ValueError(f"teacher {path} has a vocabulary of {teacher.vocab_size} ids but the "
                         f"student has {student.vocab_size}: distillation needs the same "
                         "vocabulary; use the dense model the student was pruned from")
    if layer_weight > 0 and (teacher.num_layers, teacher.hidden_size) != (
            student.num_layers, student.hidden_size):
        raise ValueError(f"teacher {path} has {teacher.num_layers} blocks of width "
                         f"{teacher.hidden_size} but the student {student.num_layers} of width "
                         f"{student.hidden_size}: the per-layer SquareHead term pairs blocks "
                         "one to one; set distill.layer_weight=0 or use a matching teacher")


def _vocab_signature(tokenizer) -> tuple:
    return (tokenizer.backend.get_vocab(with_added_tokens=True), tokenizer.bos_id,
            tokenizer.eos_id)


def check_tokenizers(student_tokenizer, teacher_path: str) -> None:
    """ValueError unless `teacher_path` holds a tokenizer with the student's vocabulary and
    BOS/EOS ids (token for token)."""
    if not os.path.isfile(os.path.join(teacher_path, "tokenizer.json")):
        raise ValueError(f"distill.teacher_path={teacher_path!r} has no tokenizer.json, so its "
                         "tokenizer cannot be checked against the student's; copy the "
                         "teacher's tokenizer files into it")
    teacher_tokenizer = load_tokenizer(teacher_path)
    if _vocab_signature(teacher_tokenizer) != _vocab_signature(student_tokenizer):
        raise ValueError(f"the teacher's tokenizer ({teacher_path}) differs from the student's "
                         "(its vocabulary or BOS/EOS ids): distillation compares them token "
                         "by token; use the dense model the student was pruned from")


def distill_loss(student: LlamaConfig, teacher: LlamaConfig, *, ce_weight: float,
                 kd_weight: float, layer_weight: float, temperature: float):
    """The objective's `loss(params, batch, rng, teacher_params, step_args)`.

    Returns `(ce_weight * ce_sum + kd_weight * kd_sum + layer_weight * sh * n, n, terms)` for
    the micro-batch, n its loss tokens and sh its SquareHead; terms `ce`, `kd` are
    (sum, n) and `squarehead` (sh * n, n), so the step reports CE and KD per loss token of
    the whole batch and SquareHead as the token-weighted mean over micro-batches
    (docs/distill.md). `kd` is absent (not computed) when `kd_weight == 0`, `squarehead`
    when `layer_weight == 0`; with both 0 the teacher's forward is not run (its params may
    be None).
    """
    with_kd, with_hidden = kd_weight > 0, layer_weight > 0

    def loss(params, batch, rng, teacher_params, step_args):
        del rng, step_args
        where = {"positions": batch["positions"], "segment_ids": batch["segment_ids"]}
        s_out = llama.forward(params, batch["inputs"], student, return_hidden=with_hidden,
                              **where)
        s_logits, s_hidden = s_out if with_hidden else (s_out, None)
        w = batch["loss_mask"].astype(jnp.float32)
        nll = token_nll(s_logits, batch["targets"])
        ce_sum, n = jnp.sum(jnp.where(w > 0, nll * w, 0.0)), jnp.sum(w)
        total, terms = ce_weight * ce_sum, {"ce": (ce_sum, n)}
        if not (with_kd or with_hidden):
            return total, n, terms
        t_out = llama.forward(jax.lax.stop_gradient(teacher_params), batch["inputs"], teacher,
                              return_hidden=with_hidden, **where)
        t_logits, t_hidden = jax.lax.stop_gradient(t_out if with_hidden else (t_out, None))
        if with_kd:
            kd_sum, _ = kd_sums(s_logits, t_logits, w, temperature)
            total = total + kd_weight * kd_sum
            terms["kd"] = (kd_sum, n)
        if with_hidden:
            sh = squarehead(s_hidden, t_hidden, w)
            total = total + layer_weight * sh * n
            terms["squarehead"] = (sh * n, n)
        return total, n, terms

    return loss


def teacher_config(config: ml_collections.ConfigDict, student: LlamaConfig) -> LlamaConfig:
    """The teacher's LlamaConfig (from its config.json; execution settings of the student's
    model section, compute dtype `distill.teacher_dtype` or the student's), checked."""
    d = check_distill_config(config)
    model_cfg = ml_collections.ConfigDict(config.model.to_dict())
    model_cfg.hf_path = d.teacher_path
    model_cfg.dtype = d.teacher_dtype or student.dtype
    model_cfg.param_dtype = d.teacher_dtype or config.model.param_dtype
    teacher = loading.model_config(model_cfg)
    check_teacher(student, teacher, layer_weight=float(d.layer_weight), path=d.teacher_path)
    return teacher


def build(config: ml_collections.ConfigDict, model: LlamaConfig, mesh: Mesh,
          rules) -> Objective:
    """`train.objective='distill'`: checks the teacher (config, vocabulary, tokenizer) before
    loading it, then places its params by the student's sharding rules (not loaded when no
    term reads it: `kd_weight=0` and `layer_weight=0`)."""
    d = check_distill_config(config)
    teacher = teacher_config(config, model)
    check_tokenizers(resolve_tokenizer(config)[0], d.teacher_path)
    loss = distill_loss(model, teacher, ce_weight=float(d.ce_weight),
                        kd_weight=float(d.kd_weight), layer_weight=float(d.layer_weight),
                        temperature=float(d.temperature))
    if not (d.kd_weight > 0 or d.layer_weight > 0):  # no term reads the teacher
        logging.warning("distill.kd_weight=0 and distill.layer_weight=0: the teacher %s is not "
                        "loaded (the loss is the student's CE alone)", d.teacher_path)
        return Objective(loss=loss)
    _, params = hf_io.load_hf(d.teacher_path, param_dtype=jnp.dtype(teacher.dtype))
    shardings = sharding.param_shardings(params, mesh, rules)
    params = sharding.shard(params, shardings)
    return Objective(loss=loss, inputs=params, input_shardings=shardings)
