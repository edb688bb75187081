"""Hugging Face export of a training run: at the end of `train`, or later from a workdir.

`python -m launch.export --workdir=DIR` writes `DIR/hf` from the newest checkpoint in
`DIR/checkpoints`, with the tokenizer the run saved in `DIR/tokenizer`. Everything needed
(model architecture, optimizer settings to describe the saved state) is read from the
checkpoint itself, so the command takes no config.
"""

import os
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sparse_llama.model import hf_io, sharding
from sparse_llama.model.config import LlamaConfig, RopeScaling
from sparse_llama.optim.factory import make_optimizer
from sparse_llama.train import state as state_lib
from sparse_llama.train.checkpoint import Checkpoints

# Files of a Hugging Face tokenizer directory worth carrying along.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "tokenizer.model", "added_tokens.json")


def save_tokenizer(tokenizer, source_dir: str | None, workdir: str) -> str:
    """Keep the run's tokenizer in `<workdir>/tokenizer` (once; process 0) and return it.

    A source directory's files are copied as they are (its chat template and settings stay);
    otherwise the tokenizer is written by its own `save`.
    """
    target = Path(workdir) / "tokenizer"
    if jax.process_index() == 0 and not (target / "tokenizer.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tokenizer.tmp-", dir=target.parent))
        try:
            if source_dir is not None:
                for name in _TOKENIZER_FILES:
                    if (Path(source_dir) / name).is_file():
                        shutil.copy2(Path(source_dir) / name, tmp / name)
            else:
                tokenizer.save(tmp)
            shutil.rmtree(target, ignore_errors=True)
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def host_params(params: dict) -> dict:
    """Numpy copies of (possibly multi-process sharded) params, on every process."""
    if jax.process_count() == 1:
        return jax.device_get(params)
    from jax.experimental import multihost_utils

    return jax.tree.map(np.asarray, multihost_utils.process_allgather(params, tiled=True))


def export_params(params: dict, model: LlamaConfig, out_dir: str, *,
                  tokenizer_dir: str | None) -> Path:
    """Write `params` as a Hugging Face checkpoint (process 0 writes, all processes call)."""
    host = host_params(params)
    if jax.process_index() == 0:
        hf_io.save_hf(host, model, out_dir, tokenizer_dir=tokenizer_dir)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("sparse_llama_export")
    return Path(out_dir).absolute()


def model_from_saved(arch: dict) -> LlamaConfig:
    """The LlamaConfig stored in a checkpoint's `model` item."""
    arch = dict(arch)
    if arch.get("rope_scaling") is not None:
        arch["rope_scaling"] = RopeScaling(**arch["rope_scaling"])
    return LlamaConfig(**arch)


def export_latest(workdir: str, out_dir: str | None = None) -> dict:
    """Export the newest checkpoint of `workdir` to `out_dir` (default `<workdir>/hf`)."""
    checkpoints = Checkpoints(workdir, read_only=True)
    try:
        step = checkpoints.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {checkpoints.directory}; train first")
        model = model_from_saved(checkpoints.saved_model(step))
        run = ml_collections.ConfigDict(checkpoints.saved_config(step))
        mesh_cfg = {"data": -1, "fsdp": 1, "tensor": 1, "rules": dict(run.mesh.rules)}
        mesh = sharding.make_mesh(mesh_cfg)
        rules = sharding.rules_from_config(mesh_cfg)
        optimizer, _ = make_optimizer(run.optimizer, run.train.steps)
        abstract = state_lib.abstract_state(model, optimizer, mesh, rules,
                                            param_dtype=jnp.dtype(run.model.param_dtype))
        state, _ = checkpoints.restore(step, abstract, model=model, with_data=False)
    finally:
        checkpoints.close()
    tokenizer_dir = os.path.join(workdir, "tokenizer")
    if not os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.json")):
        tokenizer_dir = None
    out_dir = out_dir or os.path.join(workdir, "hf")
    hf_dir = export_params(state.params, model, out_dir, tokenizer_dir=tokenizer_dir)
    return {"hf_dir": str(hf_dir), "step": step}
