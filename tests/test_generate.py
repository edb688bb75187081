"""KV-cache decoding: against the full forward, against transformers' greedy generate."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_fixtures import LLAMA3_ROPE, build_hf_model, random_tokens, save_hf_checkpoint

from sparse_llama.model import hf_io, llama
from sparse_llama.model.generate import generate, sample_token

PROMPT = random_tokens(2, 6, seed=5)
NEW = 12


@pytest.fixture(scope="module", params=["gqa", "llama3_tied"])
def model(request, tmp_path_factory):
    """(HF model, our config, our params)."""
    overrides = {"gqa": {},
                 "llama3_tied": {"rope_parameters": LLAMA3_ROPE, "tie_word_embeddings": True}}
    hf = build_hf_model(seed=7, **overrides[request.param])
    path = save_hf_checkpoint(hf, tmp_path_factory.mktemp(request.param), tokenizer=False)
    config, params = hf_io.load_hf(path)
    return hf, config, params


def _hf_greedy(hf, prompt, new, eos=None):
    prompt = torch.as_tensor(np.asarray(prompt), dtype=torch.long)
    # Explicit attention mask: otherwise transformers masks prompt tokens equal to pad_token_id.
    out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                      max_new_tokens=new, eos_token_id=eos, pad_token_id=0)
    return out[:, prompt.shape[1]:].numpy()


def test_greedy_matches_transformers(model):
    hf, config, params = model
    ours = generate(params, config, PROMPT, max_new_tokens=NEW, eos_id=[])
    assert ours.shape == (2, NEW) and ours.dtype == np.int32
    np.testing.assert_array_equal(ours, _hf_greedy(hf, PROMPT, NEW))


def test_stops_at_eos_like_transformers(model):
    hf, config, params = model
    full = generate(params, config, PROMPT[0].tolist(), max_new_tokens=NEW, eos_id=[])
    eos = full[4]  # a token greedy decoding emits: it stops at its first occurrence
    stop = full.index(eos) + 1
    ours = generate(params, config, PROMPT[0].tolist(), max_new_tokens=NEW, eos_id=eos)
    assert ours == full[:stop]
    np.testing.assert_array_equal(ours, _hf_greedy(hf, PROMPT[:1], NEW, eos=eos)[0])


def test_batch_rows_stop_independently(model):
    _, config, params = model
    full = generate(params, config, PROMPT, max_new_tokens=NEW, eos_id=[])
    eos = int(full[0, 2])
    out, lengths = generate(params, config, PROMPT, max_new_tokens=NEW, eos_id=[eos, 10**6],
                            pad_id=-1, return_lengths=True)
    for row, n in zip(range(2), lengths, strict=True):
        hits = np.flatnonzero(full[row] == eos)
        expect = hits[0] + 1 if hits.size else NEW
        assert n == expect
        np.testing.assert_array_equal(out[row, :n], full[row, :n])
        assert np.all(out[row, n:] == -1)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_cached_steps_match_full_forward(model, scan_layers):
    _, config, params = model
    config = config.replace(scan_layers=scan_layers)
    tokens = jnp.asarray(random_tokens(2, 10, seed=9))
    full = np.asarray(llama.forward(params, tokens, config))
    cache = llama.init_cache(config, 2, 16)
    logits, cache = llama.forward_cached(params, tokens[:, :4], config, cache, jnp.int32(0))
    steps = [logits]
    for i in range(4, 10):
        logits, cache = llama.forward_cached(params, tokens[:, i:i + 1], config, cache,
                                             jnp.int32(i))
        steps.append(logits)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5, rtol=0)


def test_sampling_is_deterministic_per_seed(model):
    _, config, params = model
    kw = {"max_new_tokens": NEW, "temperature": 1.5, "eos_id": []}
    a = generate(params, config, PROMPT, seed=1, **kw)
    np.testing.assert_array_equal(a, generate(params, config, PROMPT, seed=1, **kw))
    assert not np.array_equal(a, generate(params, config, PROMPT, seed=2, **kw))
    greedy = generate(params, config, PROMPT, max_new_tokens=NEW, eos_id=[])
    tiny_p = generate(params, config, PROMPT, seed=3, **{**kw, "temperature": 1.0}, top_p=1e-6)
    np.testing.assert_array_equal(tiny_p, greedy)


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    probs = jnp.asarray([[0.5, 0.3, 0.15, 0.05]])
    logits = jnp.log(probs)
    keys = jax.random.split(jax.random.key(0), 400)
    draw = jax.vmap(lambda k, p: sample_token(logits, k, jnp.float32(1.0), p)[0],
                    in_axes=(0, None))
    assert set(np.asarray(draw(keys, jnp.float32(0.5))).tolist()) == {0}
    assert set(np.asarray(draw(keys, jnp.float32(0.7))).tolist()) == {0, 1}
    assert set(np.asarray(draw(keys, jnp.float32(1.0))).tolist()) == {0, 1, 2, 3}


def test_generate_errors(model):
    _, config, params = model
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(params, config, [1, 2, 3], max_new_tokens=config.max_position_embeddings)
    with pytest.raises(ValueError, match="equal lengths"):
        generate(params, config, [[1, 2, 3], [4, 5]], max_new_tokens=2)
    with pytest.raises(ValueError, match="token ids"):
        generate(params, config, [1, config.vocab_size], max_new_tokens=2)
    with pytest.raises(ValueError, match="non-empty"):
        generate(params, config, [], max_new_tokens=2)
    with pytest.raises(ValueError, match="top_p"):
        generate(params, config, [1], max_new_tokens=2, temperature=1.0, top_p=0.0)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """{"plain": a tokenizer that adds no specials, "bos": one whose post-processor adds <s>}
    as (our Tokenizer, transformers' tokenizer, directory)."""
    import transformers
    from hf_fixtures import save_tokenizer, train_tokenizer
    from tokenizers import processors

    from sparse_llama.data.tokenizer import load_tokenizer

    out = {}
    for name in ("plain", "bos"):
        tok = train_tokenizer()
        if name == "bos":
            tok.post_processor = processors.TemplateProcessing(
                single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
        path = save_tokenizer(tmp_path_factory.mktemp(name), tok)
        out[name] = (load_tokenizer(path), transformers.AutoTokenizer.from_pretrained(path), path)
    return out


@pytest.mark.parametrize("kind", ["plain", "bos"])
def test_prompts_are_encoded_as_transformers_encodes_them(tokenizers, kind):
    from sparse_llama.commands.generate import encode_prompt

    ours, theirs, _ = tokenizers[kind]
    text = "a llama walks"
    expected = theirs(text)["input_ids"]
    assert (expected[0] == ours.bos_id) == (kind == "bos")
    assert encode_prompt(ours, text) == expected
    body = theirs(text, add_special_tokens=False)["input_ids"]
    assert encode_prompt(ours, text, add_bos=True) == [ours.bos_id, *body]  # BOS once
    assert encode_prompt(ours, text, add_bos=False) == body


def test_stop_ids_are_every_eos_of_the_generation_config(tokenizers, tmp_path):
    import json
    import shutil

    from sparse_llama.commands.generate import stop_token_ids

    ours, _, path = tokenizers["plain"]
    model_dir = shutil.copytree(path, tmp_path / "m")
    (model_dir / "config.json").write_text(json.dumps({"eos_token_id": 5}))
    assert stop_token_ids(str(model_dir), ours) == sorted({5, ours.eos_id})
    (model_dir / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [128001, 128009], "temperature": 0.6}))
    # generation_config.json wins over config.json (as in transformers); the tokenizer's EOS,
    # which our training appends to every document, always stops too.
    assert stop_token_ids(str(model_dir), ours) == sorted({128001, 128009, ours.eos_id})
