"""Mask-preserving LoRA: low-rank adapters on the target linears of a frozen (sparse) model.

Every target weight W (stored (L, in, out), llama.py) gets an adapter {"a": (L, in, r),
"b": (L, r, out)}; the adapted weight is

    W' = W + scale * (a @ b) * mask          scale = alpha / r

with `mask` the base model's mask (True = kept), so W' has exactly W's zeros: merging never
densifies a pruned model, unlike merging `W + B A` (wanda #10, #83; llm-compressor #952). The
product is applied as a select, `where(mask, W + delta, W)`, so pruned entries are W's own
exact zeros bit for bit whatever the adapter holds. `b` starts at zero (the adapted model is
the base model at step 0) and `a` at Normal(0, 1 / in).

Adapters are a plain nested dict keyed like the params (`layers/self_attn/q_proj` ->
{"a", "b"}); saved alone as one safetensors file (`save_adapters`, tensor names
`layers.self_attn.q_proj.lora_a` / `.lora_b`, rank and alpha in its metadata).

Training them is adapters/objective.py's (any objective's loss of the merged model, the base and
its masks frozen inputs of the step).
"""

import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from sparse_llama.ground.tree_paths import get_path, path_name
from sparse_llama.sparsity.masks import DEFAULT_TARGETS, is_target


def _targets(params: dict, targets: Sequence[str]) -> dict:
    """{path name: weight or its ShapeDtypeStruct} of the targeted leaves ((L, in, out))."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {path_name(p): w for p, w in flat if is_target(path_name(p), targets)}


def check_rank(params: dict, rank: int, targets: Sequence[str] = DEFAULT_TARGETS) -> None:
    """ValueError unless 0 < rank <= the smaller side of every target weight."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"finetune.lora_rank must be a positive integer, got {rank!r}")
    found = _targets(params, targets)
    if not found:
        raise ValueError(f"no LoRA target among the params (targets {list(targets)})")
    for name, w in found.items():
        width = min(w.shape[-2:])
        if rank > width:
            raise ValueError(f"finetune.lora_rank={rank} is larger than {name}'s width "
                             f"{width} (shape {tuple(w.shape[-2:])}); use a rank <= {width}")


def init_adapters(key: jax.Array, params: dict, rank: int,
                  targets: Sequence[str] = DEFAULT_TARGETS) -> dict:
    """Adapters for every target weight: a ~ Normal(0, 1 / in), b = 0 (float32)."""
    check_rank(params, rank, targets)
    found = _targets(params, targets)
    keys = jax.random.split(key, len(found))
    adapters: dict = {}
    for (name, w), k in zip(sorted(found.items()), keys, strict=True):
        *lead, d_in, d_out = w.shape
        a = jax.random.normal(k, (*lead, d_in, rank), jnp.float32) / np.sqrt(d_in)
        b = jnp.zeros((*lead, rank, d_out), jnp.float32)
        node = adapters
        for part in name.split("/")[:-1]:
            node = node.setdefault(part, {})
        node[name.split("/")[-1]] = {"a": a, "b": b}
    return adapters


def adapter_delta(adapter: dict, scale: float) -> Float[Array, "*l i o"]:
    """scale * a @ b, float32."""
    return scale * jnp.einsum("...ir,...ro->...io", adapter["a"].astype(jnp.float32),
                              adapter["b"].astype(jnp.float32))


def merge(params: dict, adapters: dict, masks: dict | None, scale: float) -> dict:
    """The adapted params: W + scale * (a @ b) * mask on every adapted weight (a select, see
    the module docstring), in W's dtype; other leaves unchanged. masks None: a dense base."""
    flat = jax.tree_util.tree_flatten_with_path(params)
    mask_leaves = (jax.tree.leaves(masks) if masks is not None
                   else [None] * len(flat[0]))
    leaves = []
    for (path, w), m in zip(flat[0], mask_leaves, strict=True):
        name = path_name(path)
        try:
            adapter = get_path(adapters, tuple(name.split("/")))
        except (KeyError, TypeError):
            leaves.append(w)
            continue
        delta = adapter_delta(adapter, scale)
        new = w.astype(jnp.float32) + delta
        if m is not None:
            new = jnp.where(m, new, w.astype(jnp.float32))
        leaves.append(new.astype(w.dtype))
    return jax.tree_util.tree_unflatten(flat[1], leaves)


def _flat_names(adapters: dict) -> dict[str, np.ndarray]:
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(adapters)[0]:
        *weight, part = path_name(path).split("/")
        out[".".join(weight) + f".lora_{part}"] = np.asarray(leaf, np.float32)
    return out


def save_adapters(adapters: dict, path: str | os.PathLike, *, rank: int, alpha: float) -> str:
    """Write the adapters alone (one safetensors file; rank and alpha in its metadata)."""
    from safetensors.numpy import save_file

    path = os.fspath(path)
    save_file(_flat_names(adapters), path, metadata={"lora_rank": str(rank),
                                                     "lora_alpha": repr(float(alpha))})
    return path


def load_adapters(path: str | os.PathLike) -> tuple[dict, int, float]:
    """(adapters, rank, alpha) from `save_adapters`' file."""
    from safetensors import safe_open

    adapters: dict = {}
    with safe_open(os.fspath(path), framework="numpy") as f:
        meta = f.metadata() or {}
        for key in f.keys():
            weight, _, part = key.rpartition(".lora_")
            node = adapters
            names = weight.split(".")
            for name in names[:-1]:
                node = node.setdefault(name, {})
            node.setdefault(names[-1], {})[part] = jnp.asarray(f.get_tensor(key))
    if "lora_rank" not in meta:
        raise ValueError(f"{path} is not a LoRA adapter file (no lora_rank in its metadata)")
    return adapters, int(meta["lora_rank"]), float(meta["lora_alpha"])
