"""The full-size recipe's sparse train step (configs/sparse70.py, stage sparse50: Llama-2-7B,
keep-sparse AdamW with its masks in the optimizer state) lowers and compiles on 8 fake CPU
devices with fsdp=8, without allocating a single weight: abstract state, abstract batch."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from configs import sparse70
from sparse_llama import loading, objectives
from sparse_llama.commands import recipe_configs as stages
from sparse_llama.ground.tree_paths import path_name
from sparse_llama.model import sharding
from sparse_llama.model.config import param_count
from sparse_llama.model.loss import BATCH_KEYS
from sparse_llama.optim.keep_sparse import KeepSparseState, find_masks
from sparse_llama.sparsity.masks import is_target
from sparse_llama.train import run_setup
from sparse_llama.train import state as state_lib
from sparse_llama.train.step import make_train_step

# A micro-batch of 8 x 2048 tokens and no accumulation, instead of the recipe's 1024 x 2048 in
# 64 micro-batches of 16: the state, its shardings and the per-step program are the same (the
# accumulation is a lax.scan whose body is one micro-batch, so its cost is the micro-batch's),
# the argument bytes differ only by the token arrays, and 8 rows is the least that splits over
# the 8 devices of the batch axes (data, fsdp); a scan adds compile time, not coverage.
MICRO_BATCH, GRAD_ACCUM = 8, 1


def _axes(spec) -> list[str]:
    out = []
    for entry in spec:
        if entry is not None:
            out.extend(entry if isinstance(entry, tuple) else (entry,))
    return out


@pytest.fixture(scope="module")
def full_step():
    config = sparse70.build("full", 0.7)
    run = stages.train_config(config, "sparse50", "")
    assert run.model.preset == "llama2_7b" and run.sparsity.keep
    assert run.data.seq_len == 2048 and run.train.grad_accum == 64
    assert jax.device_count() == 8
    mesh = sharding.make_mesh(run.mesh)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    rules = sharding.rules_from_config(run.mesh)
    model = loading.model_config(run.model)
    objective = objectives.build(run, model, mesh, rules)
    optimizer, schedule = run_setup.run_optimizer(run, objective)
    abstract = state_lib.abstract_state(model, optimizer, mesh, rules,
                                        param_dtype=jnp.dtype(run.model.param_dtype))
    shardings = jax.tree.map(lambda a: a.sharding, abstract)
    bsh = sharding.batch_sharding(mesh, rules)
    dtypes = {"inputs": jnp.int32, "targets": jnp.int32, "segment_ids": jnp.int32,
              "positions": jnp.int32, "loss_mask": jnp.float32}
    batch = {k: jax.ShapeDtypeStruct((MICRO_BATCH, run.data.seq_len), dtypes[k], sharding=bsh)
             for k in BATCH_KEYS}
    step = make_train_step(model, optimizer, schedule, grad_accum=GRAD_ACCUM,
                           state_shardings=shardings, batch_sharding=bsh, objective=objective)
    t0 = time.time()
    lowered = step.lower(abstract, batch)
    t1 = time.time()
    compiled = lowered.compile()
    t2 = time.time()
    print(f"llama2_7b sparse step: lower {t1 - t0:.1f} s, compile {t2 - t1:.1f} s")
    return {"model": model, "abstract": abstract, "compiled": compiled, "batch": batch,
            "seconds": (t1 - t0, t2 - t1)}


def test_masks_live_in_the_optimizer_state_sharded_like_their_params(full_step):
    abstract = full_step["abstract"]
    states = [x for x in jax.tree.leaves(abstract.opt_state,
                                         is_leaf=lambda x: isinstance(x, KeepSparseState))
              if isinstance(x, KeepSparseState)]
    assert len(states) == 1  # sparse50 trains sparse: the chain is wrapped in keep-sparse
    masks = find_masks(abstract.opt_state)
    pairs = zip(jax.tree_util.tree_flatten_with_path(abstract.params)[0],
                jax.tree.leaves(masks), strict=True)
    for (path, p), m in pairs:
        name = path_name(path)
        if is_target(name):
            # Catches: masks replicated on every device (a 7B's masks are 6.5 GB each).
            assert m.shape == p.shape and m.dtype == jnp.bool_, name
            assert m.sharding.spec == p.sharding.spec, name
            assert "fsdp" in _axes(m.sharding.spec), name
        else:
            assert m.shape == () and m.sharding.spec == PartitionSpec(), name
    # The moments too (the other two thirds of the state).
    specs = {path_name(path): p.sharding.spec
             for path, p in jax.tree_util.tree_flatten_with_path(abstract.params)[0]}
    moments = 0
    for path, a in jax.tree_util.tree_flatten_with_path(states[0].inner_state)[0]:
        name = path_name(path)
        if a.ndim == 0:
            continue
        param = next(k for k in specs if name.endswith("/" + k))
        assert a.sharding.spec == specs[param], name  # where its weight lives
        moments += 1
    assert moments == 2 * len(specs)  # mu and nu of every param


def test_per_device_arguments_are_one_eighth_of_params_moments_and_masks(full_step):
    model, abstract = full_step["model"], full_step["abstract"]
    n = param_count(model)
    assert sum(int(np.prod(p.shape)) for p in jax.tree.leaves(abstract.params)) == n
    masked = sum(int(np.prod(p.shape)) for path, p in
                 jax.tree_util.tree_flatten_with_path(abstract.params)[0]
                 if is_target(path_name(path)))
    # f32 params, Adam mu and nu: 12 bytes per param; bool masks: 1 byte per masked param;
    # all over 8 devices. Batch: 5 arrays of 8 x 2048 x 4 bytes, split over the 8 devices.
    hand = (12 * n + masked) / 8 + 5 * MICRO_BATCH * 2048 * 4 / 8
    stats = full_step["compiled"].memory_analysis()
    got = stats.argument_size_in_bytes
    print(f"per-device arguments {got / 2**30:.3f} GiB, hand count {hand / 2**30:.3f} GiB, "
          f"temp {stats.temp_size_in_bytes / 2**30:.3f} GiB, "
          f"output {stats.output_size_in_bytes / 2**30:.3f} GiB")
    # Catches: any state part replicated (masks replicated alone would add 5.7 GB / device,
    # 55% more), moments in another dtype, masks stored as f32.
    assert got == pytest.approx(hand, rel=0.01)
    # Donation: the new state reuses the old one's buffers, so the outputs alias the inputs.
    assert stats.alias_size_in_bytes >= 0.99 * (12 * n + masked) / 8


def test_compile_time(full_step):
    lower_s, compile_s = full_step["seconds"]
    assert lower_s + compile_s < 300, full_step["seconds"]


def test_mlp_activations_are_split_over_the_batch_devices(full_step):
    # With fsdp every device runs its own rows: 1 of the 8 here. A buffer holding all 8 rows'
    # MLP activations (L, 8, 2048, 11008) f32 = 23 GB means each device computes the whole
    # micro-batch's MLP (8x the FLOPs) and keeps it for the backward. Catches activations
    # partitioned over the embedding axis (the weights' fsdp axis) instead of the batch: that
    # is what XLA chose before the step constrained its activations (sharding.activation_rows;
    # per-device temp 72.6 GiB then, 33.5 GiB with the constraints).
    model = full_step["model"]
    text = full_step["compiled"].as_text()
    full_rows = (f"f32[{model.num_layers},{MICRO_BATCH},2048,{model.intermediate_size}]")
    count = text.count(full_rows)
    assert count == 0, (
        f"{count} buffers of {full_rows}; per-device temp "
        f"{full_step['compiled'].memory_analysis().temp_size_in_bytes / 2**30:.1f} GiB")
