"""Our forward and checkpoints against transformers' LlamaForCausalLM (CPU, float32)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_fixtures import (
    LLAMA3_ROPE,
    LLAMA3_ROPE_BAND,
    build_hf_model,
    hf_logits,
    load_hf_model,
    random_tokens,
    save_hf_checkpoint,
)
from safetensors import safe_open

from sparse_llama.ground.tree_paths import get_path, path_name
from sparse_llama.model import hf_config, hf_io, layers, llama
from sparse_llama.model.config import rope_inverse_frequencies
from sparse_llama.sparsity.masks import dense_masks, is_target

VARIANTS = {
    # hidden 48, 6 heads, 2 kv heads, MLP 80, vocab 101 (hf_fixtures.TINY)
    "gqa_odd_sizes": {},
    "mha_tied": {"num_key_value_heads": 6, "tie_word_embeddings": True},
    "llama3_rope": {"rope_parameters": LLAMA3_ROPE},
    "llama3_rope_band": {"rope_parameters": LLAMA3_ROPE_BAND, "num_attention_heads": 4,
                         "num_key_value_heads": 2, "head_dim": 16},
    "linear_rope": {"rope_parameters": {"rope_type": "linear", "factor": 4.0,
                                        "rope_theta": 10000.0}},
    "head_dim_16": {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16},
}
TOKENS = random_tokens(2, 40, seed=1)  # 40 > original_max_position_embeddings of LLAMA3_ROPE


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def ckpt(request, tmp_path_factory):
    """(HF model, its checkpoint dir, our config, our params, HF logits on TOKENS)."""
    model = build_hf_model(seed=len(request.param), **VARIANTS[request.param])
    path = save_hf_checkpoint(model, tmp_path_factory.mktemp(request.param) / "hf")
    config, params = hf_io.load_hf(path)
    return model, path, config, params, hf_logits(model, TOKENS)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_logits_match_transformers(ckpt, scan_layers):
    _, _, config, params, ref = ckpt
    ours = llama.forward(params, jnp.asarray(TOKENS), config.replace(scan_layers=scan_layers))
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=0)


def test_hidden_states_match_transformers(ckpt):
    """Every block's output against transformers' output_hidden_states (an independent forward).

    transformers returns (embeddings, block 0, ..., block L-2, final norm of block L-1); ours
    are the L block outputs. Fails if a block output is misplaced, e.g. the input of each block
    returned instead of its output, or the residual missing from it.
    """
    model, _, config, params, _ = ckpt
    _, ours = llama.forward(params, jnp.asarray(TOKENS), config, return_hidden=True)
    with torch.no_grad():
        theirs = model(torch.as_tensor(TOKENS, dtype=torch.long),
                       output_hidden_states=True).hidden_states
    theirs = [h.numpy() for h in theirs]
    assert len(theirs) == config.num_layers + 1 and ours.shape[0] == config.num_layers
    for i in range(config.num_layers - 1):
        np.testing.assert_allclose(np.asarray(ours[i]), theirs[i + 1], atol=1e-4, rtol=0)
    last = layers.rms_norm(ours[-1], params["norm"], config.rms_norm_eps)
    np.testing.assert_allclose(np.asarray(last), theirs[-1], atol=1e-4, rtol=0)


def test_llama3_rope_band_is_exercised_and_matches_transformers():
    """The inverse frequencies themselves, against transformers' own llama3 rule."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    model = build_hf_model(**VARIANTS["llama3_rope_band"])
    config = hf_config.config_from_hf(model.config.to_dict())
    rope = LLAMA3_ROPE_BAND
    head_dim = 16
    plain = 1.0 / rope["rope_theta"] ** (np.arange(0, head_dim, 2) / head_dim)
    wavelen = 2 * np.pi / plain
    old = rope["original_max_position_embeddings"]
    band = (wavelen > old / rope["high_freq_factor"]) & (wavelen < old / rope["low_freq_factor"])
    assert band.sum() >= 2  # the fixture does reach the smoothing band (else the test is void)
    theirs = ROPE_INIT_FUNCTIONS["llama3"](model.config, "cpu")[0].double().numpy()
    ours = rope_inverse_frequencies(config)
    # In the band the value is strictly between the scaled and the unscaled frequency.
    assert np.all((ours[band] < plain[band]) & (ours[band] > plain[band] / rope["factor"]))
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)


def test_save_round_trip_loads_in_transformers(ckpt, tmp_path):
    model, src, config, params, ref = ckpt
    out = hf_io.save_hf(params, config, tmp_path / "out", tokenizer_dir=src)
    assert (out / "tokenizer.json").exists() and (out / "generation_config.json").exists()
    reloaded = load_hf_model(out)
    assert reloaded.config.rms_norm_eps == model.config.rms_norm_eps
    assert reloaded.config.rope_parameters == model.config.rope_parameters
    np.testing.assert_allclose(hf_logits(reloaded, TOKENS), ref, atol=1e-5, rtol=0)
    config2, params2 = hf_io.load_hf(out)
    assert config2 == config
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_sharded_save_loads_everywhere(ckpt, tmp_path):
    _, _, config, params, ref = ckpt
    out = hf_io.save_hf(params, config, tmp_path / "sharded", max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    assert set(index["weight_map"]) == set(hf_io.hf_tensor_names(config))
    np.testing.assert_allclose(hf_logits(load_hf_model(out), TOKENS), ref, atol=1e-5, rtol=0)
    _, params2 = hf_io.load_hf(out)
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def _random_masks(params, seed=0):
    rng = np.random.default_rng(seed)

    def make(path, w, m):
        if is_target(path_name(path)):
            return jnp.asarray(rng.random(w.shape) < 0.5)
        return m
    return jax.tree_util.tree_map_with_path(make, params, dense_masks(params))


def test_masked_save_writes_exact_zeros(ckpt, tmp_path):
    _, _, config, params, _ = ckpt
    masks = _random_masks(params)
    out = hf_io.save_hf(params, config, tmp_path / "masked", masks=masks)
    with safe_open(str(out / "model.safetensors"), framework="numpy") as f:
        for name, where in hf_io.hf_tensor_names(config).items():
            w = np.asarray(get_path(params, where.path))
            m = np.broadcast_to(np.asarray(get_path(masks, where.path)), w.shape)
            if where.layer is not None:
                w, m = w[where.layer], m[where.layer]
            if where.transpose:
                w, m = w.T, m.T
            t = f.get_tensor(name)
            assert np.all(t[~m] == 0) and np.array_equal(t[m], w[m]), name
    ours = llama.forward(params, jnp.asarray(TOKENS), config, masks)
    np.testing.assert_allclose(hf_logits(load_hf_model(out), TOKENS), np.asarray(ours),
                               atol=1e-4, rtol=0)


def test_bfloat16_matches_transformers_bfloat16(tmp_path):
    model = build_hf_model(seed=3, rope_parameters=LLAMA3_ROPE)
    ref32 = hf_logits(model, TOKENS)
    model16 = model.to(torch.bfloat16)
    path = save_hf_checkpoint(model16, tmp_path / "bf16", tokenizer=False)
    config, params = hf_io.load_hf(path, param_dtype=jnp.bfloat16)
    assert config.dtype == "bfloat16" and params["embed_tokens"].dtype == jnp.bfloat16
    ours16 = np.asarray(llama.forward(params, jnp.asarray(TOKENS), config))
    theirs16 = hf_logits(model16, TOKENS)
    scale = np.abs(ref32).max()
    # Both are bf16 computations of the same weights: each is within a few bf16 ulps of the
    # float32 logits, and of each other.
    assert np.abs(ours16 - ref32).max() < 0.05 * scale
    assert np.abs(ours16 - theirs16).max() < 0.05 * scale
    # The bf16 file read into float32 params gives float32 logits of the rounded weights.
    config32, params32 = hf_io.load_hf(path, param_dtype=jnp.float32)
    ours32 = llama.forward(params32, jnp.asarray(TOKENS), config32.replace(dtype="float32"))
    np.testing.assert_allclose(np.asarray(ours32), hf_logits(model16.float(), TOKENS),
                               atol=1e-4, rtol=0)


def test_save_bfloat16_from_float32_params(ckpt, tmp_path):
    _, _, config, params, _ = ckpt
    out = hf_io.save_hf(params, config, tmp_path / "as_bf16", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded = load_hf_model(out, dtype=torch.bfloat16)
    assert reloaded.model.embed_tokens.weight.dtype == torch.bfloat16
    config2, params2 = hf_io.load_hf(out)
    assert config2 == config.replace(dtype="bfloat16")
    np.testing.assert_array_equal(np.asarray(params2["norm"]),
                                  np.asarray(params["norm"].astype(jnp.bfloat16), np.float32))
