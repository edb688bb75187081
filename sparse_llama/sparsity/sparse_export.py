"""A sparse checkpoint directory, written whole or not at all (launch.prune, sparse training).

    OUT/config.json, model.safetensors (pruned weights are exact zeros), tokenizer files
    OUT/masks/                 the bool masks (orbax), True = kept
    OUT/sparsity_report.json   exact zeros per tensor, module type, layer (counted from weights)

Everything is built in `<parent>/.<name>.partial` and renamed into place once, so a crash leaves
either the previous OUT or the new one, never a model without its masks. Every tool loads OUT as
a dense Hugging Face checkpoint; this project's commands also find the masks. All processes of
a multi-host run call these functions together.
"""

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import jax

from sparse_llama.model import hf_io
from sparse_llama.model.config import LlamaConfig
from sparse_llama.sparsity import mask_io
from sparse_llama.sparsity import masks as masks_lib
from sparse_llama.sparsity.report import sparsity_report


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def publish_dir(out: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Run `write(staging)` into a directory beside `out`, then rename it to `out` at once.

    A leftover staging directory of a killed run is removed first; an existing `out` (a
    previous output) is replaced in one rename. On an exception the staging directory is
    removed and `out` is left as it was.
    """
    out = Path(os.path.abspath(out))
    # One fixed name, not mkdtemp: every process of a multi-host run must agree on it.
    staging = out.parent / f".{out.name}.partial"
    primary = jax.process_index() == 0
    if primary:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    _sync("sparse_llama_publish_staging")
    try:
        write(staging)
        _sync("sparse_llama_publish_written")
        if primary:
            hf_io.replace_dir(staging, out)
        _sync("sparse_llama_publish_committed")
    except BaseException:
        if primary:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def write_json(path: Path, obj) -> None:
    tmp = Path(f"{path}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())  # on disk before the directory is renamed into place
    os.replace(tmp, path)


def save_sparse_hf(params: dict, config: LlamaConfig, out_dir: str | os.PathLike, *,
                   masks: dict, tokenizer_dir: str | None = None, dtype: str | None = None,
                   report: dict | None = None) -> tuple[Path, dict]:
    """Write params, their masks and the sparsity report to `out_dir` atomically.

    Every process of a multi-host run calls it with its sharded params and masks: each tensor
    is gathered on its own and process 0 writes (hf_io.write_hf, mask_io.save_masks), so no
    host holds more than one tensor beyond its own shards. Returns (the directory, the report; computed from the weights unless given). An existing
    `out_dir` is replaced only when it holds a config.json (a previous checkpoint); any other
    non-empty directory is refused before anything is written.
    """
    masks_lib.check_masks(params, masks)
    out = Path(os.path.abspath(out_dir))
    if out.exists() and (not out.is_dir() or (any(out.iterdir())
                                              and not (out / "config.json").exists())):
        raise FileExistsError(f"{out} exists and is not a checkpoint directory; refusing to "
                              "replace it (choose another output directory)")
    report = sparsity_report(params) if report is None else report

    def write(staging: Path) -> None:
        hf_io.write_hf(params, config, staging, masks=masks, tokenizer_dir=tokenizer_dir,
                       dtype=dtype)
        mask_io.save_masks(masks, staging / "masks")
        if jax.process_index() == 0:
            write_json(staging / "sparsity_report.json", report)

    return publish_dir(out, write), report
