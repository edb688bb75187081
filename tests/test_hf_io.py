"""hf_io / hf_config: config parsing and every error path, each naming the problem."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_fixtures import build_hf_model, save_hf_checkpoint
from safetensors.numpy import load_file, save_file

from sparse_llama.ground.tree_paths import get_path, set_path
from sparse_llama.model import hf_io, safetensors_stream
from sparse_llama.model.config import PRESETS, LlamaConfig, RopeScaling
from sparse_llama.model.hf_config import config_from_hf, config_to_hf, hf_eos_token_ids
from sparse_llama.sparsity.masks import dense_masks

BASE = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 101,
        "hidden_size": 48, "intermediate_size": 80, "num_hidden_layers": 2,
        "num_attention_heads": 6}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return save_hf_checkpoint(build_hf_model(), tmp_path_factory.mktemp("src") / "ckpt")


@pytest.fixture(scope="module")
def loaded(source):
    return hf_io.load_hf(source)


@pytest.fixture
def ckpt(source, tmp_path):
    """A fresh copy of the tiny checkpoint, free to break."""
    return shutil.copytree(source, tmp_path / "ckpt")


def _edit_tensors(path, edit):
    file = path / "model.safetensors"
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


# ---- config.json parsing ----

def test_config_defaults_are_transformers_defaults():
    c = config_from_hf(BASE)
    assert c.num_kv_heads == 6 and c.rms_norm_eps == 1e-6 and c.rope_theta == 10000.0
    assert c.max_position_embeddings == 2048 and c.head_dim is None and c.rope_scaling is None
    assert c.dtype == "float32" and not c.tie_word_embeddings


def test_config_reads_old_and_new_rope_keys():
    llama3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    new = config_from_hf({**BASE, "dtype": "bfloat16",
                          "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5,
                                              **llama3}})
    old = config_from_hf({**BASE, "torch_dtype": "bfloat16", "rope_theta": 5e5,
                          "rope_scaling": {"rope_type": "llama3", **llama3}})
    assert new == old
    assert new.rope_theta == 5e5 and new.rope_scaling == RopeScaling("llama3", **llama3)
    assert new.dtype == "bfloat16"
    oldest = config_from_hf({**BASE, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert oldest.rope_scaling == RopeScaling(kind="linear", factor=2.0)


def test_config_eos_list_keeps_first_and_head_dim():
    cfg = {**BASE, "eos_token_id": [128001, 128009], "head_dim": 16, "bos_token_id": None}
    c = config_from_hf(cfg)
    assert c.eos_token_id == 128001 and c.head_dim == 16 and c.bos_token_id is None
    assert hf_eos_token_ids(cfg) == [128001, 128009]
    assert config_from_hf({**BASE, "head_dim": 8}).head_dim is None  # the implied value


@pytest.mark.parametrize("name", ["tiny", "llama2_70b", "llama3_8b"])
def test_config_round_trip(name):
    c = PRESETS[name].replace(scan_layers=False, remat="none")
    assert config_from_hf(config_to_hf(c)) == c
    odd = LlamaConfig(vocab_size=101, hidden_size=48, intermediate_size=80, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=True,
                      rope_scaling=RopeScaling("linear", 2.0), eos_token_id=None)
    assert config_from_hf(config_to_hf(odd, "bfloat16")) == odd.replace(dtype="bfloat16")


@pytest.mark.parametrize("changes, match", [
    ({"model_type": "mistral"}, "'mistral' checkpoint; sparse_llama loads Llama-family"),
    ({"architectures": ["LlamaForSequenceClassification"]}, "LlamaForCausalLM"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
    ({"rope_scaling": {"rope_type": "linear"}}, "'factor'"),
    ({"vocab_size": None}, "vocab_size"),
])
def test_config_errors(changes, match):
    with pytest.raises(ValueError, match=match):
        config_from_hf({**BASE, **changes}, source="ckpt")


def test_missing_config_key_is_named():
    cfg = dict(BASE)
    del cfg["num_hidden_layers"]
    with pytest.raises(ValueError, match="num_hidden_layers"):
        config_from_hf(cfg)


# ---- load_hf ----

def test_missing_dir_and_config(tmp_path, ckpt):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hf_io.load_hf(tmp_path / "nope")
    (ckpt / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf_io.load_hf(ckpt)


def test_invalid_config_json(ckpt):
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        hf_io.load_hf(ckpt)


def test_not_llama_names_the_checkpoint(ckpt):
    _edit_config(ckpt, model_type="gpt2")
    with pytest.raises(ValueError, match=f"{ckpt} is a 'gpt2' checkpoint"):
        hf_io.load_hf(ckpt)


def test_pytorch_bin_only_asks_for_safetensors(ckpt):
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="safetensors only. Convert once"):
        hf_io.load_hf(ckpt)
    (ckpt / "pytorch_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        hf_io.load_hf(ckpt)


def test_missing_tensor_is_named(ckpt):
    _edit_tensors(ckpt, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor\(s\) \['model.layers.1.mlp.up_proj"):
        hf_io.load_hf(ckpt)


def test_untied_checkpoint_without_lm_head(ckpt):
    _edit_tensors(ckpt, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(ValueError, match="lm_head.weight"):
        hf_io.load_hf(ckpt)


def test_shape_mismatch_is_named(ckpt):
    def edit(t):
        t["model.layers.0.self_attn.k_proj.weight"] = np.zeros((8, 48), np.float32)
    _edit_tensors(ckpt, edit)
    with pytest.raises(ValueError, match=r"k_proj.weight .* shape \(8, 48\), expected \(16, 48\)"):
        hf_io.load_hf(ckpt)


def test_unexpected_tensor_errors_but_inv_freq_is_ignored(ckpt):
    def add_inv_freq(t):
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)
    _edit_tensors(ckpt, add_inv_freq)
    hf_io.load_hf(ckpt)

    def add_bias(t):
        t["model.layers.0.self_attn.q_proj.bias"] = np.zeros(48, np.float32)
    _edit_tensors(ckpt, add_bias)
    with pytest.raises(ValueError, match="tensors a Llama does not.*q_proj.bias"):
        hf_io.load_hf(ckpt)


@pytest.mark.parametrize("damage", ["header", "truncated"])
def test_corrupted_file(ckpt, damage):
    file = ckpt / "model.safetensors"
    data = bytearray(file.read_bytes())
    if damage == "header":
        data[8:40] = b"\x00garbage garbage garbage garbage"
    else:
        del data[-1000:]
    file.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="cannot read safetensors file .*model.safetensors"):
        hf_io.load_hf(ckpt)


def test_index_with_missing_shard(loaded, tmp_path):
    config, params = loaded
    out = hf_io.save_hf(params, config, tmp_path / "sharded", max_shard_bytes=30_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (out / shard).unlink()
    with pytest.raises(FileNotFoundError, match=shard):
        hf_io.load_hf(out)


# ---- save_hf ----

def test_save_refuses_to_replace_a_non_checkpoint_dir(loaded, tmp_path):
    config, params = loaded
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="holds no config.json"):
        hf_io.save_hf(params, config, tmp_path / "home")
    assert (tmp_path / "home" / "notes.txt").read_text() == "precious"


def test_save_replaces_a_previous_checkpoint(loaded, tmp_path):
    config, params = loaded
    out = hf_io.save_hf(params, config, tmp_path / "ckpt", max_shard_bytes=30_000)
    assert (out / "model.safetensors.index.json").exists()
    hf_io.save_hf(params, config, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp dirs left
    assert not (out / "model.safetensors.index.json").exists()
    jax.tree.map(np.testing.assert_array_equal, hf_io.load_hf(out)[1], params)


def test_crash_while_saving_keeps_the_previous_checkpoint(loaded, tmp_path, monkeypatch):
    config, params = loaded
    out = hf_io.save_hf(params, config, tmp_path / "ckpt")
    before = (out / "model.safetensors").read_bytes()
    calls = []

    header = safetensors_stream._header

    def crash_on_second_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return header(*args, **kwargs)
    monkeypatch.setattr(safetensors_stream, "_header", crash_on_second_shard)
    doubled = jax.tree.map(lambda w: w * 2, params)
    with pytest.raises(OSError, match="disk full"):
        hf_io.save_hf(doubled, config, out, max_shard_bytes=30_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert (out / "model.safetensors").read_bytes() == before


def test_save_argument_errors(loaded, tmp_path):
    config, params = loaded
    with pytest.raises(ValueError, match="dtype must be one of"):
        hf_io.save_hf(params, config, tmp_path / "a", dtype="int8")
    with pytest.raises(ValueError, match=r"param \['norm'\] has shape \(47,\)"):
        hf_io.save_hf({**params, "norm": jnp.ones(47)}, config, tmp_path / "a")
    no_head = {k: v for k, v in params.items() if k != "lm_head"}
    with pytest.raises(ValueError, match="missing.*lm_head"):
        hf_io.save_hf(no_head, config, tmp_path / "a")
    masks = dense_masks(params)
    masks["norm"] = jnp.ones((3,), jnp.bool_)
    with pytest.raises(ValueError, match="mask norm has shape"):
        hf_io.save_hf(params, config, tmp_path / "a", masks=masks)
    with pytest.raises(FileNotFoundError, match="tokenizer directory"):
        hf_io.save_hf(params, config, tmp_path / "a", tokenizer_dir=tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="none of the tokenizer files"):
        hf_io.save_hf(params, config, tmp_path / "a", tokenizer_dir=tmp_path / "empty")
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("path, name", [
    (("layers", "mlp", "up_proj"), "model.layers.1.mlp.up_proj.weight"),
    (("embed_tokens",), "model.embed_tokens.weight")])
def test_a_float16_overflow_is_refused_naming_the_tensor(loaded, tmp_path, path, name):
    """70000 > 65504 becomes inf in float16: one line naming the tensor, nothing published."""
    config, params = loaded
    w = np.array(get_path(params, path))
    w[(1, 3, 5) if len(path) > 1 else (3, 5)] = 7e4
    big = jax.tree.map(lambda x: x, params)
    set_path(big, path, w)
    with pytest.raises(ValueError, match=rf"^{name}: 1 value is not finite in float16 ") as err:
        hf_io.save_hf(big, config, tmp_path / "out", dtype="float16")
    assert "\n" not in str(err.value) and "65504" in str(err.value)
    assert list(tmp_path.iterdir()) == []  # no output, no staging directory
    hf_io.save_hf(big, config, tmp_path / "out", dtype="bfloat16")  # in range there


def test_tied_checkpoint_with_stored_lm_head_loads(tmp_path):
    model = build_hf_model(tie_word_embeddings=True)
    path = save_hf_checkpoint(model, tmp_path / "tied", tokenizer=False)

    def add_head(t):
        t["lm_head.weight"] = t["model.embed_tokens.weight"].copy()
    _edit_tensors(path, add_head)
    config, params = hf_io.load_hf(path)
    assert config.tie_word_embeddings and "lm_head" not in params


def test_a_training_export_keeps_every_tokenizer_file_of_its_source(loaded, source, tmp_path):
    """Source tokenizer dir -> <workdir>/tokenizer (train) -> <workdir>/hf (export): the chat
    template, BPE vocab files and generation settings all arrive, unchanged in content."""
    from sparse_llama.data.tokenizer import load_tokenizer
    from sparse_llama.train import export

    config, params = loaded
    src = tmp_path / "src"
    shutil.copytree(source, src)
    extras = {"chat_template.jinja": "{% for m in messages %}{{ m.content }}{% endfor %}",
              "vocab.json": json.dumps({"a": 0}), "merges.txt": "#version: 0.2\n"}
    for name, text in extras.items():
        (src / name).write_text(text)
    gen = {"bos_token_id": 1, "eos_token_id": [2, 7], "temperature": 0.6, "do_sample": True}
    (src / "generation_config.json").write_text(json.dumps(gen))
    tok_dir = export.save_tokenizer(load_tokenizer(src), str(src), str(tmp_path / "run"))
    for name, text in extras.items():
        assert (tmp_path / "run" / "tokenizer" / name).read_text() == text, name
    out = hf_io.save_hf(params, config, tmp_path / "run" / "hf", tokenizer_dir=tok_dir)
    for name, text in extras.items():
        assert (out / name).read_text() == text, name
    # The source's full eos list and sampling defaults, not only config.eos_token_id.
    assert json.loads((out / "generation_config.json").read_text()) == gen
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()


def test_save_hf_merges_its_generation_config_over_the_source_one(loaded, source, tmp_path):
    config, params = loaded
    src = shutil.copytree(source, tmp_path / "src")
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7],
                                                             "top_p": 0.9}))
    out = hf_io.save_hf(params, config, tmp_path / "out", tokenizer_dir=src,
                        generation_config={"top_p": 0.5})
    assert json.loads((out / "generation_config.json").read_text()) == {
        "bos_token_id": config.bos_token_id, "eos_token_id": [2, 7], "top_p": 0.5}
