"""The sequential, layer-by-layer pruning driver (`docs/algorithms.md`, "Calibration and the
sequential driver").

Block 0 is pruned with inputs from the dense embeddings; the *pruned* block then produces the
inputs of block 1, and so on. Only one block's activations (num_samples, seq_len, D) are live.
Inside a block, the linears that read the same input share one statistics pass (q/k/v read
'qkv', gate/up read 'gate_up'); with `true_sequential`, the groups are pruned in the order
{q,k,v} -> {o} -> {gate,up} -> {down} and each group's inputs are recomputed from the block
with the previous groups already pruned.

Statistics are accumulated in float32 over micro-batches of calibration windows. With a mesh,
micro-batches are sharded over the batch rule and the Gram matrices come out summed over the
devices (XLA's all-reduce: data-parallel accumulation with a psum).

The driver names no method: `PruneSpec.method` is a record (pruning/method.py; by name from
pruning/methods.py) whose `stat` says which statistic to gather and whose `solve` prunes each
linear; a `LinearPass` (quantization's) replaces it.

NaN/inf anywhere stops the run with `selection.NonFiniteError` naming the block and tensor: the
activations entering each block are checked here, each linear's weight and input statistic by
its solver. A silent fallback would write a model whose broken layer nobody notices.
"""

import dataclasses
import functools
from collections.abc import Callable, Iterator, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sparse_llama.ground import param_table
from sparse_llama.model import llama, sharding
from sparse_llama.model.config import LlamaConfig
from sparse_llama.pruning import hessian, profiles
from sparse_llama.pruning.method import Method
from sparse_llama.sparsity.masks import dense_masks
from sparse_llama.sparsity.selection import NonFiniteError, check_finite

# Which linears read each tapped input (names are paths inside a block's params).
GROUPS = param_table.tap_groups()
SEQUENTIAL_STAGES = (("qkv",), ("o_proj",), ("gate_up",), ("down_proj",))
ONE_STAGE = (("qkv", "o_proj", "gate_up", "down_proj"),)


@dataclasses.dataclass(frozen=True)
class PruneSpec:
    """What the driver prunes, how much, and with which method."""

    method: Method | None  # the record (methods.get(name)); None: a LinearPass solves instead
    layer_sparsity: tuple[float, ...]  # one value per decoder block
    n: int = 0  # N:M (n pruned in every m consecutive inputs); 0:0 = unstructured
    m: int = 0
    module_sparsity: tuple[tuple[str, float], ...] = ()  # per-module-type overrides
    true_sequential: bool = False
    batch_size: int = 8  # calibration windows per micro-batch

    def __post_init__(self):
        if self.method is not None and not isinstance(self.method, Method):
            raise TypeError(f"PruneSpec.method={self.method!r}: pass a method record "
                            "(sparse_llama.pruning.methods.get(name)) or None")
        for s in self.layer_sparsity:
            profiles.check_sparsity(s)
        if (self.n, self.m) != (0, 0) and not 0 < self.n < self.m:
            raise ValueError(f"N:M pattern {self.n}:{self.m} needs 0 < N < M (e.g. 2:4); set "
                             "pruning.n=pruning.m=0 for unstructured")
        if self.batch_size < 1:
            raise ValueError(f"calibration batch size must be positive, got {self.batch_size}")


def _module_get(block: dict, name: str):
    group, leaf = name.split("/")
    return block[group][leaf]


def _module_set(block: dict, name: str, value) -> dict:
    group, leaf = name.split("/")
    return {**block, group: {**block[group], leaf: value}}


_STATS = {
    "gram": (hessian.init, hessian.accumulate, hessian.finalize),
    "sqnorm": (hessian.init_sq_norms, hessian.accumulate_sq_norms, hessian.finalize_sq_norms),
    "absmax": (hessian.init_absmax, hessian.accumulate_absmax, hessian.finalize_absmax),
}


@dataclasses.dataclass(frozen=True)
class LinearPass:
    """How a calibration pass treats each linear: `PruneSpec.method`'s (`method_pass`), or
    otherwise (quantization, with or without pruning in the same pass;
    sparse_llama/quant/calibrate.py).

    stat: the statistic `solve` gets of each linear's input ('gram', 'sqnorm' or None).
    solve(block, name, w (in, out), stat, sparsity, mask (in, out) or 0-d) -> (w, mask):
      called for every targeted linear, whatever its sparsity.
    prepare(block, params of the block, stats) -> params of the block: runs before the
      block's statistics; `stats(groups, kind)` gives that statistic of the tapped inputs
      (SmoothQuant's activation maxima).
    """

    stat: str | None
    solve: Callable
    prepare: Callable | None = None


@functools.partial(jax.jit, static_argnames=("config", "kind"))
def _tap_stats(p: dict, x, states: dict, config: LlamaConfig, kind: str) -> dict:
    """Fold one micro-batch into the statistic of every tapped input named in `states`."""
    cos, sin, mask = llama.rope_and_mask(x.shape[:2], config)
    _, _, taps = llama.block_with_taps(p, x, cos, sin, mask, config)
    accumulate = _STATS[kind][1]
    return {g: accumulate(state, taps[g].astype(jnp.float32)) for g, state in states.items()}


@jax.jit
def _count_nonfinite(chunks: list):
    """NaN/inf entries of all micro-batches: one program and one sync, not three eager ops
    and one sync per micro-batch."""
    return sum(jnp.sum(~jnp.isfinite(x), dtype=jnp.int32) for x in chunks)


@functools.partial(jax.jit, static_argnames=("config",))
def _block_out(p: dict, x, config: LlamaConfig):
    cos, sin, mask = llama.rope_and_mask(x.shape[:2], config)
    return llama.block(p, x, cos, sin, mask, config)[0]


class Activations:
    """The current block's inputs for all calibration windows, in micro-batches."""

    def __init__(self, chunks: list, mesh: Mesh | None, rules: Mapping | None):
        self.chunks, self.mesh, self.rules = chunks, mesh, rules or {}

    def place(self, x):
        if self.mesh is None:
            # Committed like the weights (`_placement`): an uncommitted block-0 input and
            # committed later ones would compile _tap_stats and _block_out twice each.
            return jax.device_put(x, _placement(None))
        if x.shape[0] % sharding.batch_width(self.mesh, self.rules):
            return x  # a last, partial micro-batch that does not split evenly: not sharded
        return jax.device_put(x, sharding.batch_sharding(self.mesh, self.rules, ndim=3))

    def stats(self, p, config, groups, kind) -> dict:
        """Finalized statistic (Hessian or squared norms) of each group's input."""
        init, _, finalize = _STATS[kind]
        widths = {"qkv": config.hidden_size, "o_proj": config.q_width,
                  "gate_up": config.hidden_size, "down_proj": config.intermediate_size}
        # Placed as _tap_stats' outputs will be: one compile, not one for the first call.
        states = jax.device_put({g: init(widths[g]) for g in groups}, _placement(self.mesh))
        for x in self.chunks:
            states = _tap_stats(p, self.place(x), states, config, kind)
        return {g: finalize(state) for g, state in states.items()}

    def check_finite(self, block: int) -> None:
        """Raise NonFiniteError when the inputs of `block` hold NaN/inf."""
        bad = int(_count_nonfinite([self.place(x) for x in self.chunks]))
        if bad:
            source = ("the token embeddings (model.embed_tokens.weight)" if block == 0
                      else f"the output of block {block - 1}")
            raise NonFiniteError(
                f"block {block}: its calibration inputs, {source}, have {bad} NaN/inf entries; "
                "check the checkpoint's weights, or prune in float32 if it overflowed")

    def advance(self, p, config) -> "Activations":
        return Activations([_block_out(p, self.place(x), config) for x in self.chunks],
                            self.mesh, self.rules)


def blocks_of(params: dict) -> Callable[[int], dict]:
    """`block(i)`: decoder block i's weights of a params tree (unstacked, a cheap slice). The
    driver reads a model only through such a function (a checkpoint on disk gives another,
    pruning/stream.py, that reads each block when it is pruned)."""
    return functools.partial(llama.layer_params, params)


def embed_windows(embed_tokens, windows: np.ndarray, config: LlamaConfig,
                  batch_size: int) -> list:
    """The block-0 inputs of `windows` (n, t), in micro-batches of `batch_size`."""
    params = {"embed_tokens": jnp.asarray(embed_tokens)}  # one host-to-device copy, not one per batch
    return [llama.embed(params, jnp.asarray(windows[i:i + batch_size]), config)
            for i in range(0, windows.shape[0], batch_size)]


def _tensor_name(block: int, name: str) -> str:
    """'model.layers.3.self_attn.q_proj.weight': the name a user finds in the checkpoint."""
    return f"model.layers.{block}.{name.replace('/', '.')}.weight"


def prune_linear(method: Method, spec: PruneSpec, w_in_out, stat, sparsity: float,
                 mask_in_out):
    """Prune one linear stored (in, out) with `method` (`spec`'s pattern) -> (w, mask). One
    with nothing to prune (sparsity 0, unstructured) comes back as it is, unsolved."""
    if sparsity == 0.0 and (spec.n, spec.m) == (0, 0):
        return w_in_out, mask_in_out
    mask = None if mask_in_out is None or mask_in_out.ndim == 0 else mask_in_out
    return method.solve(method.params, w_in_out, stat, sparsity=sparsity, n=spec.n, m=spec.m,
                        mask=mask)


def method_pass(spec: PruneSpec) -> LinearPass:
    """The pass that prunes every targeted linear with `spec.method`."""
    if spec.method is None:
        raise ValueError("PruneSpec.method is None: pass a method record or a LinearPass")

    def solve(block, name, w_in_out, stat, sparsity, mask_in_out):
        del block, name
        return prune_linear(spec.method, spec, w_in_out, stat, sparsity, mask_in_out)

    return LinearPass(stat=spec.method.stat, solve=solve)


def owl_outlier_ratios(block: Callable[[int], dict], inputs: list, config: LlamaConfig, *,
                       m: float, mesh: Mesh | None = None, rules=None,
                       progress: Callable | None = None) -> list[float]:
    """OWL's D_l for every block, from a dense pass over the calibration windows.

    All layer sparsities depend on every D_l (min/max normalisation), so they are measured
    before any pruning, on the dense model, as the published OWL implementation does.
    inputs: the calibration windows' block-0 inputs (`embed_windows`).
    """
    acts = Activations(inputs, mesh, rules)
    place = _placement(mesh)
    ratios = []
    for i in range(config.num_layers):
        acts.check_finite(i)
        p = jax.device_put(block(i), place)
        norms = acts.stats(p, config, tuple(GROUPS), "sqnorm")
        # Stored (in, out): input feature j is row j, hence norms[:, None].
        metrics = {name: jnp.abs(_module_get(p, name)) * jnp.sqrt(norms[g])[:, None]
                   for g, names in GROUPS.items() for name in names}
        for name, a in metrics.items():
            try:
                check_finite(a, "its OWL metric |W| * ||X||")
            except NonFiniteError as err:
                raise NonFiniteError(f"block {i} {_tensor_name(i, name)}: {err}") from None
        ratios.append(profiles.outlier_ratio(list(metrics.values()), m))
        acts = acts.advance(p, config)
        if progress is not None:
            progress(i)
    return ratios


def _placement(mesh: Mesh | None):
    """Every block's weights placed alike: the first block's would otherwise be host arrays
    and the later ones device arrays, two placements that compile every solver twice."""
    return (NamedSharding(mesh, PartitionSpec()) if mesh is not None
            else jax.sharding.SingleDeviceSharding(jax.devices()[0]))


class PrunedBlock(NamedTuple):
    layer: int
    dense: dict | None  # the block as read (device arrays), with keep_dense=True
    pruned: dict  # its pruned weights: pruned entries are exact zeros
    masks: dict  # the block's masks (0-d True for untargeted leaves)


def prune_blocks(block: Callable[[int], dict], inputs: list, config: LlamaConfig,
                 spec: PruneSpec, *, initial_masks: Callable[[int, dict], dict] | None = None,
                 mesh: Mesh | None = None, rules=None, linear_pass: LinearPass | None = None,
                 keep_dense: bool = False) -> Iterator[PrunedBlock]:
    """Prune the model block by block, yielding each block as soon as it is done.

    Only one block's weights, its masks and the calibration activations are live here: the
    caller decides what to keep (`prune_model` stacks them; pruning/stream.py writes them to
    disk and lets them go). block(i): the block's weights (host or device arrays); inputs:
    block 0's inputs, the calibration windows embedded (`embed_windows`).
    initial_masks(i, block) -> the masks the block starts from (what they prune stays pruned);
    default all True. linear_pass: solve the linears with its `solve` (and `prepare` each
    block) instead of `spec.method`. keep_dense: yield the block as read too (otherwise each
    dense weight is freed as soon as its pruned one replaces it).
    """
    if len(spec.layer_sparsity) != config.num_layers:
        raise ValueError(f"{len(spec.layer_sparsity)} layer sparsities for a model with "
                         f"{config.num_layers} layers")
    linear_pass = method_pass(spec) if linear_pass is None else linear_pass
    kind = linear_pass.stat
    overrides = dict(spec.module_sparsity)
    stages = SEQUENTIAL_STAGES if spec.true_sequential else ONE_STAGE
    acts = Activations(inputs, mesh, rules)
    del inputs  # advanced block by block: the embedded windows are not kept
    place = _placement(mesh)
    for i in range(config.num_layers):
        acts.check_finite(i)
        p = jax.device_put(block(i), place)
        layer_masks = dense_masks(p) if initial_masks is None else initial_masks(i, p)
        layer_masks = jax.device_put(layer_masks, place)
        dense = p if keep_dense else None
        if linear_pass.prepare is not None:
            p = linear_pass.prepare(i, p, functools.partial(acts.stats, p, config))
        for stage in stages:
            stats = acts.stats(p, config, stage, kind) if kind else {}
            for g in stage:
                for name in GROUPS[g]:
                    s = profiles.module_sparsity(spec.layer_sparsity[i], name, overrides)
                    try:
                        new_w, new_mask = linear_pass.solve(
                            i, name, _module_get(p, name), stats.get(g), s,
                            _module_get(layer_masks, name))
                    except NonFiniteError as err:  # the solver cannot know where it runs
                        raise NonFiniteError(f"block {i} {_tensor_name(i, name)}: {err}"
                                             ) from None
                    p = _module_set(p, name, new_w)
                    layer_masks = _module_set(layer_masks, name, new_mask)
        acts = acts.advance(p, config)
        yield PrunedBlock(i, dense, p, layer_masks)


def _stack(blocks: list[dict], like: dict) -> dict:
    """The stacked tree (`like`'s structure and dtypes) of per-block trees, leaf by leaf so
    that only one stacked leaf is built at a time; `like`'s 0-d leaves (masks of untargeted
    tensors) stay as they are."""
    flat = [jax.tree.leaves(b) for b in blocks]
    refs, treedef = jax.tree.flatten(like)
    out = []
    for k, ref in enumerate(refs):
        out.append(jnp.stack([f[k] for f in flat]).astype(ref.dtype) if jnp.ndim(ref) else ref)
        for f in flat:
            f[k] = None
    return jax.tree.unflatten(treedef, out)


def prune_model(params: dict, config: LlamaConfig, windows: np.ndarray, spec: PruneSpec, *,
                masks: dict | None = None, mesh: Mesh | None = None, rules=None,
                progress: Callable | None = None,
                linear_pass: LinearPass | None = None) -> tuple[dict, dict]:
    """Prune every targeted linear of every block; returns (pruned params, masks).

    windows: (num_samples, seq_len) calibration token ids. masks: existing masks (params'
    structure) to extend: what they pruned stays pruned. The returned masks have the params'
    structure (0-d True for untargeted leaves), and pruned entries are exact zeros. Each block
    is pruned once and the stack is built at the end (no full-stack copy per block).
    linear_pass: solve the linears with its `solve` (and `prepare` each block) instead.
    """
    masks = dense_masks(params) if masks is None else masks
    new_params, new_masks = [], []
    inputs = embed_windows(params["embed_tokens"], windows, config, spec.batch_size)
    for done in prune_blocks(blocks_of(params), inputs, config, spec,
                             initial_masks=lambda i, _: llama.layer_params(masks, i),
                             mesh=mesh, rules=rules, linear_pass=linear_pass):
        new_params.append(done.pruned)
        new_masks.append(done.masks)
        if progress is not None:
            progress(done.layer)
    return ({**params, "layers": _stack(new_params, params["layers"])},
            {**masks, "layers": _stack(new_masks, masks["layers"])})
