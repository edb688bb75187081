"""Sparsity reports: exact zeros per tensor, per module type, per layer and overall."""

import jax
import numpy as np

from sparse_llama.sparsity.masks import DEFAULT_TARGETS, is_target, path_name


def sparsity_report(params, targets=DEFAULT_TARGETS) -> dict:
    """Fractions of exact zeros in the targeted tensors (stacked layer tensors split per layer).

    Returns {"overall", "per_module", "per_layer", "per_tensor": [{name, layer, shape,
    sparsity}]}: the JSON written next to a pruned checkpoint.
    """
    zeros_by_module: dict[str, list[int]] = {}
    zeros_by_layer: dict[int, list[int]] = {}
    tensors = []
    total = [0, 0]
    for path, w in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = path_name(path)
        if not is_target(name, targets):
            continue
        w = np.asarray(w)
        stacked = name.startswith("layers/")
        for layer, block in enumerate(w if stacked else [w]):
            zeros, size = int(np.sum(block == 0)), int(block.size)
            module = name.removeprefix("layers/")
            tensors.append({"name": module, "layer": layer if stacked else None,
                            "shape": list(block.shape), "sparsity": zeros / size})
            for table, key in ((zeros_by_module, module), (zeros_by_layer, layer)):
                acc = table.setdefault(key, [0, 0])
                acc[0] += zeros
                acc[1] += size
            total[0] += zeros
            total[1] += size
    if total[1] == 0:
        raise ValueError(f"no targeted tensors found among the params (targets: {targets})")
    return {
        "overall": total[0] / total[1],
        "per_module": {k: z / n for k, (z, n) in zeros_by_module.items()},
        "per_layer": {str(k): z / n for k, (z, n) in sorted(zeros_by_layer.items())},
        "per_tensor": tensors,
    }


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
