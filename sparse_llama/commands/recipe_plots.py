"""The PNG plots a recipe leaves in its workdir (matplotlib, no display needed).

    loss.png      training loss over all train stages on one token axis, stage boundaries
                  marked and named, each stage's perplexity in its label
    sparsity.png  per-layer sparsity of the final model, one line per module type
"""

import json
import os

import jax
import matplotlib

matplotlib.use("Agg")  # files only: no display on pods or CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from sparse_llama.model import hf_io
from sparse_llama.sparse_io.report import sparsity_report


def _train_curve(metrics_path: str) -> tuple[list[int], list[float]]:
    """(steps, losses) of a run's metrics.jsonl; a step recorded twice (a resumed run redid
    it) keeps its later record."""
    by_step: dict[int, float] = {}
    with open(metrics_path) as f:
        for line in f:
            record = json.loads(line)
            if record.get("kind") == "train":
                by_step[int(record["step"])] = float(record["loss"])
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def loss_plot(workdir: str, records: list[dict], path: str) -> None:
    fig, ax = plt.subplots(figsize=(9, 4.5))
    offset = 0.0
    for record in records:
        if record.get("kind") == "prune":  # a one-shot step: marked where it happened
            ax.axvline(offset, color="red", linestyle="--", linewidth=1)
            ax.text(offset, 0.92, f" {record['name']} (ppl {record['perplexity']:.2f})",
                    transform=ax.get_xaxis_transform(), va="top", fontsize=8, color="red")
        if record.get("kind") != "train":
            continue
        metrics = os.path.join(workdir, record["name"], "metrics.jsonl")
        if not os.path.isfile(metrics):
            continue
        steps, losses = _train_curve(metrics)
        per_step = record["tokens"] / max(record.get("steps", 1), 1)
        x = [offset + s * per_step for s in steps]
        label = f"{record['name']} (ppl {record['perplexity']:.2f})"
        ax.plot(x, losses, label=label)
        ax.axvline(offset, color="grey", linestyle=":", linewidth=1)
        ax.text(offset, 1.0, f" {record['name']}", transform=ax.get_xaxis_transform(),
                va="top", fontsize=8, color="grey")
        offset += record["tokens"]
    ax.set_xlabel("training tokens")
    ax.set_ylabel("train loss (mean token NLL)")
    ax.set_title("loss over all stages")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sparsity_plot(report: dict, path: str, title: str) -> None:
    by_module: dict[str, dict[int, float]] = {}
    for tensor in report["per_tensor"]:
        if tensor["layer"] is not None:
            by_module.setdefault(tensor["name"], {})[tensor["layer"]] = tensor["sparsity"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for module, values in sorted(by_module.items()):
        layers = sorted(values)
        ax.plot(layers, [values[i] for i in layers], marker="o", label=module.split("/")[-1])
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("sparsity (exact zeros)")
    ax.set_ylim(0.0, 1.0)
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(workdir: str, records: list[dict]) -> dict:
    """Write both plots (process 0 only); returns their paths."""
    paths = {"loss": os.path.join(workdir, "loss.png"),
             "sparsity": os.path.join(workdir, "sparsity.png")}
    if jax.process_index() != 0 or not records:
        return paths
    loss_plot(workdir, records, paths["loss"])
    final = records[-1]
    report_path = os.path.join(final["hf_dir"], "sparsity_report.json")
    if os.path.isfile(report_path):
        with open(report_path) as f:
            report = json.load(f)
    else:
        report = sparsity_report(hf_io.load_hf(final["hf_dir"])[1])
    sparsity_plot(report, paths["sparsity"],
                  f"per-layer sparsity after {final['name']} ({report['overall']:.1%} overall)")
    return paths
