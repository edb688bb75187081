"""Per-layer, per-module sparsity targets: uniform, OWL, an explicit list, module overrides.

A profile resolves to a (num_layers,) array of block sparsities; `module_sparsity` then applies
per-module-type overrides (e.g. keep `down_proj` at 50% while the rest goes to 70%).
"""

from collections.abc import Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

PROFILES = ("uniform", "owl", "list")


def check_sparsity(value: float, what: str = "pruning.sparsity") -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{what}={value} is outside [0, 1); give the fraction of weights to "
                         "prune, e.g. 0.5")


def uniform(num_layers: int, sparsity: float) -> np.ndarray:
    check_sparsity(sparsity)
    return np.full(num_layers, sparsity, np.float64)


def explicit(values: Sequence[float], num_layers: int) -> np.ndarray:
    if len(values) != num_layers:
        raise ValueError(f"pruning.layer_sparsities has {len(values)} entries but the model has "
                         f"{num_layers} layers; give one sparsity per decoder block")
    for i, v in enumerate(values):
        check_sparsity(v, f"pruning.layer_sparsities[{i}]")
    return np.asarray(values, np.float64)


def outlier_ratio(metrics: Sequence[Float[Array, "..."]], m: float) -> float:
    """OWL's D_l: the fraction of entries of the block's Wanda metrics A = |W| * ||X||_2 that
    exceed m times their mean (mean over all the block's linears together)."""
    total = sum(int(a.size) for a in metrics)
    mean = sum(float(jnp.sum(a)) for a in metrics) / total
    return sum(int(jnp.sum(a > m * mean)) for a in metrics) / total


def owl(ratios: Sequence[float] | Float[np.ndarray, " layers"], sparsity: float,
        lam: float) -> Float[np.ndarray, " layers"]:
    """OWL layer sparsities (`docs/algorithms.md`, "OWL"): mean S, spread 2 lam, less pruning
    where there are more outliers.

    As the published code: the min-max normalised ratios r (in [0, 2 lam]) are centred on their
    mean, so the values lie in [S - lam, S + lam] only when mean(r) = lam; with skewed ratios
    one end may pass the band (by at most lam), never the mean or the spread.
    """
    check_sparsity(sparsity)
    if not 0 <= lam < 1:
        raise ValueError(f"pruning.owl_lambda={lam} must be in [0, 1)")
    d = np.asarray(ratios, np.float64)
    spread = d.max() - d.min()
    if spread == 0:
        return np.full(d.shape, sparsity)
    r = (d - d.min()) / spread * 2 * lam
    density = r - r.mean() + (1 - sparsity)
    out = 1 - density
    if out.min() < 0 or out.max() >= 1:
        raise ValueError(f"OWL gives layer sparsities in [{out.min():.3f}, {out.max():.3f}], "
                         "outside [0, 1); lower pruning.owl_lambda")
    return out


def module_sparsity(layer_value: float, module: str, overrides: Mapping[str, float]) -> float:
    """The sparsity of one linear ('self_attn/q_proj', ...) given its block's value.

    An override is keyed by the module name ('down_proj') or its path ('mlp/down_proj').
    """
    for key in (module, module.rsplit("/", 1)[-1]):
        if key in overrides:
            check_sparsity(float(overrides[key]), f"pruning.module_sparsity.{key}")
            return float(overrides[key])
    return float(layer_value)
