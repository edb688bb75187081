"""Up-front validation of a training config: every problem names its key and the fix.

Runs before anything is loaded or compiled, so a typo costs a second, not a compile. Checks
that need the mesh or the model (batch divisibility over devices, seq_len against the context,
the tokenizer's vocabulary) are the `check_*` functions the loop calls once those exist.
"""

import ml_collections

from sparse_llama import loading

_SECTIONS = {"model": "blocks.model()", "mesh": "blocks.mesh()", "data": "blocks.data()",
             "train": "blocks.train()", "optimizer": "blocks.optimizer()"}


def _require(problems: list, ok: bool, message: str) -> None:
    if not ok:
        problems.append(message)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_train_config(config: ml_collections.ConfigDict) -> None:
    """Raise ValueError listing every invalid value of the train/optimizer/data sections."""
    missing = [k for k in _SECTIONS if k not in config]
    if missing:
        raise ValueError("the config has no " + ", ".join(
            f"'{k}' section (add config.{k} = configs.{_SECTIONS[k]})" for k in missing))
    loading.check_model_section(config.model)
    t, o, d = config.train, config.optimizer, config.data
    p: list[str] = []
    for key, low in (("steps", 1), ("batch_size", 1), ("grad_accum", 1), ("log_every", 1),
                     ("keep_checkpoints", 1), ("eval_every", 0), ("eval_batches", 0),
                     ("checkpoint_every", 0), ("seed", 0), ("data_shards", 0)):
        value = t.get(key)
        _require(p, _is_int(value) and value >= low,
                 f"train.{key} must be an integer >= {low}, got {value!r}")
    if _is_int(t.get("batch_size")) and _is_int(t.get("grad_accum")) and t.grad_accum >= 1:
        _require(p, t.batch_size % t.grad_accum == 0,
                 f"train.batch_size={t.batch_size} must be a multiple of train.grad_accum="
                 f"{t.grad_accum} (each update is grad_accum equal micro-batches)")
    _require(p, _is_int(d.get("seq_len")) and d.seq_len >= 2,
             f"data.seq_len must be an integer >= 2, got {d.get('seq_len')!r}")
    number = (int, float)
    lr = o.get("lr")
    _require(p, isinstance(lr, number) and lr > 0,
             f"optimizer.lr must be a positive number, got {lr!r}")
    warmup = o.get("warmup_steps")
    _require(p, _is_int(warmup) and warmup >= 0,
             f"optimizer.warmup_steps must be an integer >= 0, got {warmup!r}")
    if _is_int(warmup) and _is_int(t.get("steps")):
        _require(p, warmup <= t.steps, f"optimizer.warmup_steps={warmup} exceeds train.steps="
                 f"{t.steps}; lower the warmup or train longer")
    for key, low, high in (("min_lr_ratio", 0.0, 1.0), ("b1", 0.0, 0.999999),
                           ("b2", 0.0, 0.999999)):
        value = o.get(key)
        _require(p, isinstance(value, number) and low <= value <= high,
                 f"optimizer.{key} must be in [{low}, {high:g}], got {value!r}")
    for key, strict in (("weight_decay", False), ("clip_norm", False), ("eps", True)):
        value = o.get(key)
        ok = isinstance(value, number) and (value > 0 if strict else value >= 0)
        _require(p, ok, f"optimizer.{key} must be a {'positive' if strict else 'non-negative'} "
                 f"number, got {value!r}")
    if p:
        raise ValueError("invalid training config: " + "; ".join(p))


def check_batch_layout(batch_size: int, grad_accum: int, batch_devices: int,
                       process_count: int, data_shards: int = 0) -> None:
    """Each micro-batch must split evenly over the batch-sharded devices, the processes and
    the data shards (0: one per process)."""
    micro = batch_size // grad_accum
    if micro % batch_devices:
        raise ValueError(
            f"train.batch_size / train.grad_accum = {micro} sequences per micro-batch do not "
            f"split over the {batch_devices} devices of the mesh's batch axes; make it a "
            f"multiple of {batch_devices} (or change mesh.rules.batch)")
    shards = data_shards or process_count
    if shards % process_count:
        raise ValueError(f"train.data_shards={data_shards} must be a multiple of the "
                         f"{process_count} processes (each reads the same number of shards)")
    if batch_size % shards:
        raise ValueError(f"train.batch_size={batch_size} does not split into {shards} data "
                         f"shards; make it a multiple of {shards} (or change train.data_shards)")

