"""Mesh, logical-axis rules and sharded execution on 8 fake CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from configs import blocks
from sparse_llama.model import llama, sharding
from sparse_llama.model.config import preset
from sparse_llama.sparsity import masks as masks_lib


def mesh_cfg(data, fsdp, tensor):
    cfg = blocks.mesh()
    cfg.data, cfg.fsdp, cfg.tensor = data, fsdp, tensor
    return cfg


def test_eight_devices_are_available():
    assert jax.device_count() == 8


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2), (1, 4, 2), (-1, 2, 1)])
def test_sharded_forward_equals_unsharded(shape):
    cfg = preset("tiny").replace(scan_layers=True)
    params = llama.init_params(jax.random.key(0), cfg)
    tokens = jax.random.randint(jax.random.key(1), (8, 16), 0, cfg.vocab_size)
    ref = llama.forward(params, tokens, cfg)
    mc = mesh_cfg(*shape)
    mesh, rules = sharding.make_mesh(mc), sharding.rules_from_config(mc)
    sharded = sharding.shard(params, sharding.param_shardings(params, mesh, rules))
    batch = jax.device_put(tokens, sharding.batch_sharding(mesh, rules))
    out = jax.jit(llama.forward, static_argnums=2)(sharded, batch, cfg)
    np.testing.assert_allclose(out, ref, atol=2e-5)


def test_rules_shard_params_masks_and_optimizer_state_alike():
    cfg = preset("tiny")
    params = llama.init_params(jax.random.key(0), cfg)
    mc = mesh_cfg(2, 2, 2)
    mesh, rules = sharding.make_mesh(mc), sharding.rules_from_config(mc)
    p_sh = sharding.param_shardings(params, mesh, rules)
    assert p_sh["layers"]["mlp"]["gate_proj"].spec == P(None, "fsdp", "tensor")
    assert p_sh["layers"]["mlp"]["down_proj"].spec == P(None, "tensor", "fsdp")
    assert p_sh["embed_tokens"].spec == P("tensor", "fsdp")
    m_sh = sharding.param_shardings(masks_lib.dense_masks(params), mesh, rules)
    assert m_sh["layers"]["mlp"]["gate_proj"].spec == p_sh["layers"]["mlp"]["gate_proj"].spec
    assert m_sh["norm"].spec == P()  # 0-d mask of a dense leaf: replicated
    opt = optax.adamw(1e-3)
    o_sh = sharding.opt_state_shardings(opt, jax.eval_shape(opt.init, params), p_sh, mesh)
    assert o_sh[0].mu["layers"]["self_attn"]["q_proj"].spec == P(None, "fsdp", "tensor")
    assert o_sh[0].count.spec == P()


def test_indivisible_axes_fall_back_to_replicated():
    mc = mesh_cfg(1, 1, 8)
    mesh, rules = sharding.make_mesh(mc), sharding.rules_from_config(mc)
    # 100 MLP channels do not divide by 8 devices on 'tensor': stays whole; 512 vocab does.
    spec = sharding.spec_for((2, 64, 100), ("layers", "embed", "mlp"), rules, mesh)
    assert spec == P(None, None, None)
    assert sharding.spec_for((512, 64), ("vocab", "embed"), rules, mesh) == P("tensor", None)


@pytest.mark.parametrize("shape, message", [
    ((3, 1, 1), "does not fit 8 devices"),
    ((-1, -1, 1), "at most one axis"),
    ((2, 2, 1), "uses 4 devices"),
])
def test_bad_meshes_are_rejected(shape, message):
    with pytest.raises(ValueError, match=message):
        sharding.make_mesh(mesh_cfg(*shape))


def test_unknown_mesh_axis_in_rules():
    mc = mesh_cfg(8, 1, 1)
    mc.rules.mlp = "model"
    with pytest.raises(ValueError, match="mesh.rules.mlp"):
        sharding.rules_from_config(mc)


def test_70b_shards_over_a_pod_mesh_without_allocating():
    cfg = preset("llama2_70b")
    shapes = jax.eval_shape(lambda k: llama.init_params(k, cfg, jnp.bfloat16), jax.random.key(0))
    mc = mesh_cfg(1, 4, 2)
    mesh, rules = sharding.make_mesh(mc), sharding.rules_from_config(mc)
    sh = sharding.param_shardings(shapes, mesh, rules)
    per_device = sum(
        np.prod(s.shape) * 2 / np.prod([mesh.shape[a] for a in _axes(sh_.spec)])
        for s, sh_ in zip(jax.tree.leaves(shapes), jax.tree.leaves(sh), strict=True))
    assert per_device < 140e9 / 8 * 1.01  # every big tensor is split 8 ways


def _axes(spec):
    out = []
    for entry in spec:
        if entry is None:
            continue
        out.extend(entry if isinstance(entry, tuple) else (entry,))
    return out
