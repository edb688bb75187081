"""Every Llama parameter's facts in one table: its path in our params tree, its Hugging Face
name, its shape, its logical sharding axes, whether the HF file stores it transposed, whether
it is pruned by default, and which tapped block input feeds it.

The model's shapes (model/llama.py), the sharding rules (model/sharding.py), the HF name map
(model/hf_io.py), the default pruning targets (sparsity/masks.py) and the pruning driver's
tap groups (pruning/driver.py) are all read from here, so an architecture detail is one edit.
It sits on the ground floor because the mask pytrees (below the model) need the targets.
"""

from typing import NamedTuple


class Param(NamedTuple):
    path: tuple[str, ...]  # in our params tree; block tensors live under "layers"
    hf_name: str  # "{i}" is the layer index
    # Dimension letters of our layout (in, out), without the leading layer axis:
    # v vocab, d hidden, f intermediate, q query width (heads * head_dim), k kv width.
    dims: str
    logical: tuple[str, ...]  # logical axis names, one per dimension (sharding rules)
    transposed: bool  # Hugging Face stores it (out, in)
    prunable: bool  # in the default pruning target spec
    tap: str | None = None  # the tapped block input it reads (pruning statistics)


def _linear(group: str, name: str, dims: str, logical: tuple[str, str], tap: str) -> Param:
    return Param(("layers", group, name), f"model.layers.{{i}}.{group}.{name}.weight", dims,
                 logical, transposed=True, prunable=True, tap=tap)


def _norm(path: tuple[str, ...], hf_name: str) -> Param:
    return Param(path, hf_name, "d", ("norm",), transposed=False, prunable=False)


# In the order the checkpoint writers lay tensors out (embeddings, each block, then the head).
PARAMS: tuple[Param, ...] = (
    Param(("embed_tokens",), "model.embed_tokens.weight", "vd", ("vocab", "embed"),
          transposed=False, prunable=False),
    _norm(("layers", "input_layernorm"), "model.layers.{i}.input_layernorm.weight"),
    _linear("self_attn", "q_proj", "dq", ("embed", "heads"), "qkv"),
    _linear("self_attn", "k_proj", "dk", ("embed", "kv_heads"), "qkv"),
    _linear("self_attn", "v_proj", "dk", ("embed", "kv_heads"), "qkv"),
    _linear("self_attn", "o_proj", "qd", ("heads", "embed"), "o_proj"),
    _norm(("layers", "post_attention_layernorm"),
          "model.layers.{i}.post_attention_layernorm.weight"),
    _linear("mlp", "gate_proj", "df", ("embed", "mlp"), "gate_up"),
    _linear("mlp", "up_proj", "df", ("embed", "mlp"), "gate_up"),
    _linear("mlp", "down_proj", "fd", ("mlp", "embed"), "down_proj"),
    _norm(("norm",), "model.norm.weight"),
    Param(("lm_head",), "lm_head.weight", "dv", ("embed", "vocab"), transposed=True,
          prunable=False),
)

# The default pruning targets by leaf name (q/k/v/o and gate/up/down; docs/algorithms.md).
PRUNABLE: tuple[str, ...] = tuple(p.path[-1] for p in PARAMS if p.prunable)


def by_leaf_name() -> dict[str, Param]:
    """leaf name ('q_proj', 'norm', ...) -> its row."""
    return {p.path[-1]: p for p in PARAMS}


def tap_groups() -> dict[str, tuple[str, ...]]:
    """tapped input -> the block-relative paths ('self_attn/q_proj') of the linears reading it,
    in table order."""
    groups: dict[str, tuple[str, ...]] = {}
    for p in PARAMS:
        if p.tap is not None:
            groups[p.tap] = (*groups.get(p.tap, ()), "/".join(p.path[1:]))
    return groups
