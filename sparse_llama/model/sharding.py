"""One mesh, logical axis names on every param, and rules mapping them to mesh axes.

Every sharding decision in the project goes through this module: params, masks (same tree) and
optimizer state (through `optax.tree_map_params`) all get their layout from the same rules.
A logical axis whose size does not divide by its mesh axes falls back to replicated, so odd
test shapes and small models still run on any mesh.
"""

import contextlib
import contextvars
import math
from collections.abc import Mapping

import jax
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sparse_llama.ground import param_table
from sparse_llama.ground.tree_paths import path_name

MESH_AXES = ("data", "fsdp", "tensor")
MeshConfig = ml_collections.ConfigDict | Mapping

# Logical axes of each param, by its name (the last path component; layer leaves get "layers"
# in front). Names follow llama.param_shapes.
_LOGICAL = {name: p.logical for name, p in param_table.by_leaf_name().items()}


def make_mesh(mesh_cfg: MeshConfig, devices=None) -> Mesh:
    """Mesh with axes (data, fsdp, tensor); one axis may be -1 to take the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes, strict=True))}")
    known = math.prod(s for s in sizes if s != -1)
    if any(s == 0 or s < -1 for s in sizes) or len(devices) % known:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} does not fit {len(devices)} "
                         "devices: the product of the axis sizes must equal the device count "
                         "(set one axis to -1 to absorb the rest)")
    sizes = [len(devices) // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} uses {math.prod(sizes)} devices "
                         f"but {len(devices)} are available")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def rules_from_config(mesh_cfg: MeshConfig) -> dict[str, tuple[str, ...]]:
    """'data,fsdp' -> ('data', 'fsdp'); '' -> () (replicated)."""
    rules = {}
    for logical, axes in dict(mesh_cfg["rules"]).items():
        parsed = tuple(a.strip() for a in str(axes).split(",") if a.strip())
        unknown = [a for a in parsed if a not in MESH_AXES]
        if unknown:
            raise ValueError(f"mesh.rules.{logical} names unknown mesh axes {unknown}; "
                             f"use a comma-separated subset of {MESH_AXES}")
        rules[logical] = parsed
    return rules


def logical_axes(tree) -> dict:
    """Logical axis names for every leaf of a params-like tree (0-d leaves get ())."""
    def axes(path, leaf):
        name = path_name(path)
        structured = hasattr(leaf, "logical_axes")  # names its own arrays (model/linear.py)
        if not structured and np.ndim(leaf) == 0:
            return ()
        base = _LOGICAL.get(name.rsplit("/", 1)[-1])
        if base is None:
            raise ValueError(f"no logical axes known for param {name!r}; add it to "
                             "sparse_llama/ground/param_table.py")
        if name.startswith("layers/"):
            base = ("layers", *base)
        if structured:
            return leaf.logical_axes(base)
        if len(base) != np.ndim(leaf):
            raise ValueError(f"param {name!r} has {np.ndim(leaf)} dims but logical axes {base}")
        return base
    return jax.tree_util.tree_map_with_path(
        axes, tree, is_leaf=lambda x: hasattr(x, "logical_axes"))


def spec_for(shape, names: tuple[str, ...], rules: Mapping, mesh: Mesh) -> PartitionSpec:
    """PartitionSpec for one array; an axis that does not divide evenly stays replicated."""
    used: set[str] = set()
    spec = []
    for dim, name in zip(shape, names, strict=True):
        axes = tuple(a for a in rules.get(name, ()) if a not in used and mesh.shape[a] > 1)
        if axes and dim % math.prod(mesh.shape[a] for a in axes) == 0:
            used.update(axes)
            spec.append(axes[0] if len(axes) == 1 else axes)
        else:
            spec.append(None)
    return PartitionSpec(*spec)


def param_shardings(tree, mesh: Mesh, rules: Mapping):
    """NamedShardings for params, masks or any tree with the params' structure."""
    names = logical_axes(tree)
    return jax.tree.map(
        lambda leaf, n: NamedSharding(mesh, spec_for(np.shape(leaf), n, rules, mesh)),
        tree, names, is_leaf=lambda x: isinstance(x, tuple))


def opt_state_shardings(optimizer: optax.GradientTransformation, opt_state, param_sh, mesh: Mesh):
    """Shardings for an optimizer state: params-shaped parts follow the params, rest replicated.

    `opt_state` may be the abstract state from `jax.eval_shape(optimizer.init, params)`.
    Params-shaped parts include the masks of a `keep_sparse` state (optim/keep_sparse.py):
    its init maps optax's placeholder params to masks that are the placeholder, so
    `tree_map_params` finds them like Adam's moments. Their full-shape leaves take their
    param's sharding; their 0-d leaves (dense tensors) are replicated, since a 0-d array
    cannot carry its (sharded) param's spec. A full-shape mask is thus split exactly like its
    weight, never replicated on every device.
    """
    replicated = NamedSharding(mesh, PartitionSpec())

    def like_param(leaf, sh: NamedSharding) -> NamedSharding:
        return replicated if np.ndim(leaf) == 0 else sh

    return optax.tree_map_params(
        optimizer, like_param, opt_state, param_sh,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, NamedSharding))


def batch_width(mesh: Mesh, rules: Mapping) -> int:
    """How many ways the batch axis is split (a batch must be a multiple of this)."""
    return math.prod(mesh.shape[a] for a in rules.get("batch", ()))


def batch_sharding(mesh: Mesh, rules: Mapping, ndim: int = 2) -> NamedSharding:
    """Leading (batch) axis over the rule for 'batch', the rest replicated."""
    axes = tuple(a for a in rules.get("batch", ()) if mesh.shape[a] > 1)
    lead = None if not axes else (axes[0] if len(axes) == 1 else axes)
    return NamedSharding(mesh, PartitionSpec(lead, *([None] * (ndim - 1))))


def shard(tree, shardings):
    """Place a host or device tree onto the given shardings."""
    return jax.tree.map(jax.device_put, tree, shardings)


# The layout a traced step asks for its activations (set while a step is traced; None: let
# the compiler choose, e.g. in eager or single-device code).
_ROWS = contextvars.ContextVar("sparse_llama_activation_rows", default=None)


@contextlib.contextmanager
def activation_rows(batch_sh: NamedSharding | None):
    """While tracing under it, `constrain_rows` splits activations' leading (batch) axis as
    `batch_sh` splits a batch: each device computes its own rows (FSDP / data parallelism),
    instead of letting XLA partition activations like the weights' embed axis."""
    token = _ROWS.set(batch_sh)
    try:
        yield
    finally:
        _ROWS.reset(token)


def constrain_rows(x: jax.Array) -> jax.Array:
    """`x` (batch, ...) constrained to the current `activation_rows` layout (no-op without)."""
    sh = _ROWS.get()
    if sh is None:
        return x
    spec = PartitionSpec(sh.spec[0], *([None] * (x.ndim - 1)))
    return jax.lax.with_sharding_constraint(x, NamedSharding(sh.mesh, spec))


def map_rows(fn, *args):
    """`fn(*args)` with every array argument (batch, ...) split by rows as the current
    `activation_rows` layout says, each device running `fn` on its own rows (jax.shard_map):
    for a kernel XLA cannot partition itself (a Pallas call), which it would otherwise run on
    the whole batch on every device. None arguments pass through; without a layout, a plain
    call. `fn` must be row-wise (nothing mixes rows) and return one (batch, ...) array."""
    sh = _ROWS.get()
    if sh is None:
        return fn(*args)
    rows = PartitionSpec(sh.spec[0])
    specs = tuple(None if a is None else rows for a in args)
    return jax.shard_map(fn, mesh=sh.mesh, in_specs=specs, out_specs=rows,
                         check_vma=False)(*args)


def host_array(x, layer: int | None = None) -> np.ndarray:
    """`x` (or its `layer` slice) as one numpy array on this process. A param sharded over
    several processes is gathered one slice at a time (every process must call, in the same
    order), so a writer's host memory holds one tensor, never the model."""
    if layer is not None:
        x = x[layer]
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
