"""Sparsity reports: exact zeros per tensor, per module type, per layer and overall."""

import jax
import numpy as np

from sparse_llama.ground.tree_paths import path_name
from sparse_llama.model import hf_io, sharding
from sparse_llama.model.config import LlamaConfig
from sparse_llama.sparsity.masks import DEFAULT_TARGETS, is_target


def tensor_counts(module: str, layer: int | None, w) -> dict:
    """One tensor's entry of a report, with its counts: {name, layer, shape, zeros, size}."""
    w = np.asarray(w)
    return {"name": module, "layer": layer, "shape": list(w.shape),
            "zeros": int(np.sum(w == 0)), "size": int(w.size)}


def summarize(counts) -> dict:
    """The report of `tensor_counts` entries (a model's targeted tensors, in any order: the
    report lists them by module, then layer, whatever order they were counted in).

    Returns {"overall", "per_module", "per_layer", "per_tensor": [{name, layer, shape,
    sparsity}]}: the JSON written next to a pruned checkpoint.
    """
    zeros_by_module: dict[str, list[int]] = {}
    zeros_by_layer: dict[int, list[int]] = {}
    tensors = []
    total = [0, 0]
    for c in sorted(counts, key=lambda c: (c["name"], c["layer"] is None, c["layer"] or 0)):
        zeros, size = c["zeros"], c["size"]
        tensors.append({"name": c["name"], "layer": c["layer"], "shape": c["shape"],
                        "sparsity": zeros / size})
        for table, key in ((zeros_by_module, c["name"]), (zeros_by_layer, c["layer"])):
            acc = table.setdefault(key, [0, 0])
            acc[0] += zeros
            acc[1] += size
        total[0] += zeros
        total[1] += size
    if total[1] == 0:
        raise ValueError("no targeted tensors to report on")
    return {
        "overall": total[0] / total[1],
        "per_module": {k: z / n for k, (z, n) in sorted(zeros_by_module.items())},
        "per_layer": {str(k): z / n for k, (z, n) in sorted(
            zeros_by_layer.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))},
        "per_tensor": tensors,
    }


def sparsity_report(params, targets=DEFAULT_TARGETS) -> dict:
    """Fractions of exact zeros in the targeted tensors (stacked layer tensors split per
    layer, each brought to the host on its own: `sharding.host_array`); `summarize`'s dict."""
    counts = []
    for path, w in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = path_name(path)
        if not is_target(name, targets):
            continue
        stacked = name.startswith("layers/")
        module = name.removeprefix("layers/")
        for layer in range(w.shape[0]) if stacked else [None]:
            counts.append(tensor_counts(module, layer, sharding.host_array(w, layer)))
    if not counts:
        raise ValueError(f"no targeted tensors found among the params (targets: {targets})")
    return summarize(counts)


class WrittenCounts:
    """`tensor_counts` of the targeted tensors as a checkpoint writer stores them: call it
    with each (Hugging Face name, stored array) (`hf_io.write_hf`'s `on_tensor`, the streamed
    pruner's writes), then `report()`. Counted after the mask and the cast to the stored
    dtype, so a kept weight that underflowed to 0 (float16, bfloat16) counts as a zero."""

    def __init__(self, config: LlamaConfig, targets=DEFAULT_TARGETS):
        self._names = hf_io.hf_tensor_names(config)
        self._targets = targets
        self.counts: list[dict] = []

    def __call__(self, name: str, stored: np.ndarray) -> None:
        where = self._names[name]
        path = "/".join(where.path)
        if is_target(path, self._targets):
            self.counts.append(tensor_counts(path.removeprefix("layers/"), where.layer,
                                             stored.T if where.transpose else stored))

    def report(self) -> dict:
        return summarize(self.counts)


def format_report(report: dict) -> str:
    """A small text table: one row per layer, one column per module type."""
    modules = list(report["per_module"])
    short = [m.rsplit("/", 1)[-1].replace("_proj", "") for m in modules]
    lines = ["layer " + " ".join(f"{s:>6}" for s in short) + "   block"]
    by_key = {(t["layer"], t["name"]): t["sparsity"] for t in report["per_tensor"]}
    for layer, value in report["per_layer"].items():
        cells = " ".join(f"{by_key.get((int(layer), m), float('nan')):6.3f}" for m in modules)
        lines.append(f"{layer:>5} {cells}   {value:.3f}")
    cells = " ".join(f"{report['per_module'][m]:6.3f}" for m in modules)
    lines.append(f"{'all':>5} {cells}   {report['overall']:.3f}")
    return "\n".join(lines)
