"""A packed model (`model.packed`) serves exactly what the dense masked model computes."""

import functools

import hf_fixtures
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from configs import eval as eval_config
from configs import generate as generate_config
from sparse_llama import kernels, loading
from sparse_llama.commands import eval as eval_run
from sparse_llama.commands import generate as completion
from sparse_llama.ground.tree_paths import path_name
from sparse_llama.kernels.serving import pack_params
from sparse_llama.model import llama
from sparse_llama.model.config import preset
from sparse_llama.sparsity.masks import DEFAULT_TARGETS, dense_masks, is_target
from sparse_llama.sparsity.selection import mask_smallest_nm


@functools.partial(jax.jit, static_argnums=1)
def pruned_masks(params, fmt: str):
    """2:4 along the in axis, or 60% unstructured, by magnitude (the project's own pruning)."""
    def one(path, w, m):
        if not is_target(path_name(path)):
            return m
        if fmt == "2:4":
            return mask_smallest_nm(jnp.abs(w), 2, 4, axis=-2)
        return jnp.abs(w) > jnp.quantile(jnp.abs(w), 0.6)
    return jax.tree_util.tree_map_with_path(one, params, dense_masks(params))


_forward = jax.jit(llama.forward, static_argnums=2)  # one compile per tree structure


@pytest.mark.parametrize("fmt", ["bitmask", "2:4"])
def test_packed_model_logits_equal_the_dense_masked_model(fmt):
    config = preset("tiny")
    params = llama.init_params(jax.random.key(0), config)
    masks = pruned_masks(params, fmt)
    masked = jax.tree.map(lambda w, m: w * m, params, masks)
    packed = pack_params(masked, fmt)
    targets = [path_name(p) for p, leaf in jax.tree_util.tree_leaves_with_path(
        packed, is_leaf=kernels.is_packed) if kernels.is_packed(leaf)]
    assert len(targets) == len(DEFAULT_TARGETS)
    tokens = jnp.asarray(hf_fixtures.random_tokens(2, 9, config.vocab_size, seed=1))
    want = _forward(params, tokens, config, masks)
    # Scanned and (2:4 only, to keep the test short) unrolled layers slice the packed leaves.
    for scan in (True, False) if fmt == "2:4" else (True,):
        got = _forward(packed, tokens, config.replace(scan_layers=scan))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    if fmt == "2:4":  # the KV-cache path (decode) sees the same weights (any format)
        cache = llama.init_cache(config, 2, 16)
        got, _ = llama.forward_cached(packed, tokens, config, cache, jnp.int32(0))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def pruned_checkpoint(tmp_path_factory):
    """A tiny HF checkpoint whose linear weights are 2:4 along their inputs."""
    model = hf_fixtures.build_hf_model(max_position_embeddings=256)
    with torch.no_grad():
        for name, w in model.named_parameters():
            if name.rsplit(".", 2)[-2] in DEFAULT_TARGETS:
                g = w.view(w.shape[0], -1, 4)
                g.mul_(g.abs().argsort(dim=-1).argsort(dim=-1) >= 2)
    root = tmp_path_factory.mktemp("packed")
    text = root / "text.txt"
    text.write_text(" ".join(hf_fixtures.SENTENCES * 10))
    return hf_fixtures.save_hf_checkpoint(model, root / "ckpt"), text


def test_eval_and_generate_run_a_packed_checkpoint(pruned_checkpoint):
    ckpt, text = pruned_checkpoint
    results = {}
    for packed in ("", "2:4"):  # bitmask: same loading path, its model test is above
        config = eval_config.get_config()
        config.model.hf_path, config.model.packed = str(ckpt), packed
        config.data.eval_path, config.data.seq_len = str(text), 16
        ev = eval_run.run(config)
        gen_config = generate_config.get_config()
        gen_config.model.hf_path, gen_config.model.packed = str(ckpt), packed
        gen_config.prompt, gen_config.max_new_tokens = hf_fixtures.SENTENCES[0], 6
        results[packed] = ev, completion.run(gen_config)
    (dense_ev, dense_gen) = results[""]
    assert dense_ev["packed"] is None and dense_ev["tokens_per_s"] > 0
    ev, gen = results["2:4"]
    assert ev["packed"] == "2:4" and gen["packed"] == "2:4" and ev["tokens_per_s"] > 0
    np.testing.assert_allclose(ev["perplexity"], dense_ev["perplexity"], rtol=1e-5)
    assert gen["tokens"] == dense_gen["tokens"]


def test_bad_packed_options_are_refused_before_loading(tmp_path):
    config = eval_config.get_config()
    config.model.packed = "2:8"
    with pytest.raises(ValueError, match=r"model.packed='2:8' is not a packed format"):
        loading.check_model_section(config.model)
    params = llama.init_params(jax.random.key(0), preset("tiny"))  # dense: not 2:4
    with pytest.raises(ValueError, match=r"^layers/\w+/\w+_proj: weight is not 2:4"):
        pack_params(params, "2:4")
