"""Layer-streamed pruning (pruning/stream.py), the streamed safetensors writer and the one-bit
masks file.

The streamed prune of a checkpoint on disk must write exactly what pruning the whole model in
memory and saving it writes: the same weights bit for bit, the same masks, the same report,
and the perplexities `evaluate_windows` gives the dense and the pruned model. The masks file is
checked against numpy's own bit unpacking of the Hugging Face layout, and older (orbax) masks
directories still load.
"""

import json

import hf_fixtures
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from sparse_llama.eval import perplexity
from sparse_llama.model import hf_io, llama, safetensors_stream
from sparse_llama.pruning import driver, methods, stream
from sparse_llama.sparse_io import mask_io
from sparse_llama.sparse_io.report import sparsity_report
from sparse_llama.sparsity import masks as masks_lib

# Heads 4 x 12, MLP 40: the packed rows of q/k/v/o (48 inputs) and down (40) are whole bytes,
# gate/up's are not: 40 inputs = 5 bytes, but the k/v rows have (out=24, in=48).
HF = dict(hidden_size=48, intermediate_size=40, num_attention_heads=4, num_key_value_heads=2,
          num_hidden_layers=3)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    model = hf_fixtures.build_hf_model(**HF)
    ckpt = hf_fixtures.save_hf_checkpoint(model, root / "ckpt")
    config, params = hf_io.load_hf(ckpt)
    rng = np.random.default_rng(0)
    windows = rng.integers(0, config.vocab_size, (10, 24)).astype(np.int32)
    eval_windows = rng.integers(0, config.vocab_size, (5, 24)).astype(np.int32)
    return root, ckpt, config, params, windows, eval_windows


def _spec(config, method="sparsegpt", **kw):
    sparsity = kw.pop("sparsity", 0.5)
    return driver.PruneSpec(method=methods.get(method),
                            layer_sparsity=(sparsity,) * config.num_layers,
                            batch_size=4, **kw)


@pytest.mark.parametrize("method, kw", [("sparsegpt", {}), ("wanda", {"n": 2, "m": 4})],
                         ids=["sparsegpt50", "wanda24"])
def test_streamed_prune_writes_what_the_in_memory_prune_saves(checkpoint, tmp_path, method, kw):
    _, ckpt, config, params, windows, eval_windows = checkpoint
    spec = _spec(config, method, **kw)
    pruned, masks = driver.prune_model(params, config, windows, spec)

    out = tmp_path / "streamed"
    out.mkdir()
    source = stream.checkpoint_source(hf_io.open_checkpoint(ckpt), np.float32)
    report, before, after = stream.prune_to_dir(source, config, windows, spec, out,
                                                dtype="float32", eval_windows=eval_windows,
                                                eval_batch_size=2)
    hf_io.write_hf_metadata(config, out, dtype="float32")
    _, loaded = hf_io.load_hf(out)
    jax.tree.map(np.testing.assert_array_equal, loaded, pruned)
    jax.tree.map(np.testing.assert_array_equal, mask_io.load_masks(out / "masks", loaded),
                 jax.tree.map(np.asarray, masks))
    assert report == sparsity_report(pruned)

    def ppl(p):
        return perplexity.evaluate_windows(p, config, eval_windows, batch_size=2).perplexity
    assert before == pytest.approx(ppl(params), rel=1e-5)
    assert after == pytest.approx(ppl(pruned), rel=1e-5)
    assert after > before * 1.001  # the pruned model's own number, not the dense one again


def test_the_stream_reads_each_part_once_and_only_when_it_is_needed(checkpoint, tmp_path):
    _, ckpt, config, _, windows, _ = checkpoint
    source = stream.checkpoint_source(hf_io.open_checkpoint(ckpt), np.float32)
    events = []

    def logged(name, fn):
        def read(*args):
            events.append((name, *args))
            return fn(*args)
        return read

    def progress(i):
        events.append(("written", i))

    logged_source = stream.Source(*(logged(n, fn) for n, fn in zip(
        ("embed", "read", "head"), source, strict=True)))
    stream.prune_to_dir(logged_source, config, windows, _spec(config, "magnitude"), tmp_path,
                        dtype="float32", progress=progress)
    blocks = [(kind, i) for i in range(config.num_layers) for kind in ("read", "written")]
    assert events == [("embed",), *blocks, ("head",)]
    assert set(source.head()) == {"norm", "lm_head"}


def test_masks_file_is_the_hf_layout_bit_packed(checkpoint, tmp_path, monkeypatch):
    _, _, config, params, windows, _ = checkpoint
    _, masks = driver.prune_model(params, config, windows, _spec(config, "magnitude",
                                                                 sparsity=0.3))
    monkeypatch.setattr(mask_io, "MAX_SHARD_BYTES", 200)  # several files and an index
    mask_io.save_masks(masks, tmp_path / "masks")
    index = json.loads((tmp_path / "masks" / "masks.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1
    tensors = {}
    for f in files:
        tensors.update(load_file(str(tmp_path / "masks" / f)))
    assert len(tensors) == 7 * config.num_layers  # targeted linears only
    for layer in range(config.num_layers):
        for module in ("self_attn.k_proj", "mlp.down_proj"):
            group, leaf = module.split(".")
            want = np.asarray(masks["layers"][group][leaf][layer]).T  # HF (out, in)
            bits = tensors[f"model.layers.{layer}.{module}.weight"]
            assert bits.dtype == np.uint8 and bits.shape == (want.shape[0],
                                                             -(-want.shape[1] // 8))
            # Bit 7 of byte j is input 8j (numpy's default big bit order).
            first = (bits[:, 0] >> 7).astype(bool)
            np.testing.assert_array_equal(first, want[:, 0])
            np.testing.assert_array_equal(
                np.unpackbits(bits, axis=1)[:, :want.shape[1]].astype(bool), want)
    with safe_open(str(tmp_path / "masks" / files[0]), "numpy") as f:
        assert f.metadata()["format"] == mask_io.FORMAT
    loaded = mask_io.load_masks(tmp_path / "masks", params)
    jax.tree.map(np.testing.assert_array_equal, loaded, jax.tree.map(np.asarray, masks))
    assert loaded["norm"].shape == () and loaded["norm"]


def test_masks_written_by_orbax_still_load(checkpoint, tmp_path):
    _, _, config, params, _, _ = checkpoint
    masks = masks_lib.masks_from_zeros(jax.tree.map(
        lambda w: np.where(np.abs(w) < 0.05, 0, w), params))
    host = jax.tree.map(np.asarray, masks)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(str(tmp_path / "old"), host)
    jax.tree.map(np.testing.assert_array_equal,
                 mask_io.load_masks(tmp_path / "old", params), host)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "masks.safetensors").write_bytes(b"\x10" + b"\x00" * 20)
    with pytest.raises(ValueError, match="not a readable masks directory"):
        mask_io.load_masks(tmp_path / "broken")


def test_writer_streams_the_format_and_refuses_a_wrong_order(tmp_path):
    import ml_dtypes

    rng = np.random.default_rng(0)
    tensors = {"b": rng.normal(size=(3, 5)).astype(np.float32),
               "a": rng.normal(size=(4,)).astype(ml_dtypes.bfloat16),
               "c": rng.integers(0, 255, (2, 3)).astype(np.uint8)}
    specs = [safetensors_stream.TensorSpec(k, v.shape, np.dtype(v.dtype).name)
             for k, v in tensors.items()]
    safetensors_stream.write_tensors(tmp_path, specs, tensors.items(), max_shard_bytes=40,
                                     prefix="t")
    index = json.loads((tmp_path / "t.safetensors.index.json").read_text())
    assert index["weight_map"] == {"a": "t-00002-of-00002.safetensors",
                                   "b": "t-00001-of-00002.safetensors",
                                   "c": "t-00002-of-00002.safetensors"}
    assert index["metadata"]["total_size"] == 60 + 8 + 6
    read = {}
    for f in set(index["weight_map"].values()):
        read.update(load_file(str(tmp_path / f)))  # the format's own reader
    for k, v in tensors.items():
        np.testing.assert_array_equal(read[k], v)
    writer = safetensors_stream.ShardedWriter(tmp_path / "", specs, prefix="u",
                                              max_shard_bytes=10**6)
    with pytest.raises(ValueError, match="tensor a .* arrived where the plan has b"):
        writer.add("a", tensors["a"])
    writer.add("b", tensors["b"])
    with pytest.raises(ValueError, match="stopped before tensor a"):
        writer.close()


def test_a_sharded_checkpoint_streams_into_shards(checkpoint, tmp_path, monkeypatch):
    _, ckpt, config, params, windows, _ = checkpoint
    monkeypatch.setattr(hf_io, "DEFAULT_MAX_SHARD_BYTES", 40_000)
    sharded = hf_io.save_hf(params, config, tmp_path / "sharded", max_shard_bytes=30_000)
    assert (sharded / "model.safetensors.index.json").exists()
    source = stream.checkpoint_source(hf_io.open_checkpoint(sharded), np.float32)
    out = tmp_path / "out"
    out.mkdir()
    spec = _spec(config, "magnitude")
    stream.prune_to_dir(source, config, windows, spec, out, dtype="bfloat16")
    hf_io.write_hf_metadata(config, out, dtype="bfloat16")
    assert len(list(out.glob("model-*.safetensors"))) > 1
    _, loaded = hf_io.load_hf(out)
    pruned, _ = driver.prune_model(params, config, windows, spec)
    want = jax.tree.map(lambda w: np.asarray(w.astype("bfloat16").astype(np.float32)), pruned)
    jax.tree.map(np.testing.assert_array_equal, loaded, want)
    assert llama.count_params(loaded) == llama.count_params(params)
