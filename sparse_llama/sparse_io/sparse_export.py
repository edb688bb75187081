"""A sparse checkpoint directory, written whole or not at all (launch.prune, sparse training).

    OUT/config.json, model.safetensors (pruned weights are exact zeros), tokenizer files
    OUT/masks/masks.safetensors the masks, one bit per weight (sparse_io/mask_io.py), 1 = kept
    OUT/sparsity_report.json   exact zeros per tensor, module type, layer (counted from the
                               weights as written: masked and cast to the stored dtype)

Everything is built in `<parent>/.<name>.partial` and renamed into place once
(ground/publish.py), so a crash leaves
either the previous OUT or the new one, never a model without its masks. Every tool loads OUT as
a dense Hugging Face checkpoint; this project's commands also find the masks. All processes of
a multi-host run call these functions together.
"""

import os
from pathlib import Path

import jax

from sparse_llama.ground.publish import check_replaceable, publish_dir, write_json
from sparse_llama.model import hf_io
from sparse_llama.model.config import LlamaConfig
from sparse_llama.sparse_io import mask_io
from sparse_llama.sparse_io.report import WrittenCounts
from sparse_llama.sparsity import masks as masks_lib


def save_sparse_hf(params: dict, config: LlamaConfig, out_dir: str | os.PathLike, *,
                   masks: dict, tokenizer_dir: str | None = None, dtype: str | None = None,
                   report: dict | None = None) -> tuple[Path, dict]:
    """Write params, their masks and the sparsity report to `out_dir` atomically.

    Every process of a multi-host run calls it with its sharded params and masks: each tensor
    is gathered on its own and process 0 writes (hf_io.write_hf, mask_io.save_masks), so no
    host holds more than one tensor beyond its own shards. Returns (the directory, the
    report: unless given, counted from the tensors as written, `report.WrittenCounts`). A
    value the cast to `dtype` overflows (float16 above 65504) is an error naming the tensor,
    and nothing is published. An existing `out_dir` is replaced only when it holds a
    config.json (a previous checkpoint); any other non-empty directory is refused before
    anything is written.
    """
    masks_lib.check_masks(params, masks)
    check_replaceable(out_dir)
    counts = WrittenCounts(config) if report is None else None
    written = {}

    def write(staging: Path) -> None:
        hf_io.write_hf(params, config, staging, masks=masks, tokenizer_dir=tokenizer_dir,
                       dtype=dtype, on_tensor=counts)
        mask_io.save_masks(masks, staging / "masks")
        written["report"] = report if counts is None else counts.report()
        if jax.process_index() == 0:
            write_json(staging / "sparsity_report.json", written["report"])

    return publish_dir(out_dir, write), written["report"]
