"""Soft prompts: exact against the model on real prefix tokens, only the prompt trains."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparse_llama.model import llama, soft_prompt
from sparse_llama.model.config import preset
from sparse_llama.train import state as state_lib
from sparse_llama.train.objective import Objective
from sparse_llama.train.step import make_train_step

CFG = preset("tiny").replace(vocab_size=64, max_position_embeddings=64)


@pytest.fixture(scope="module")
def params():
    return llama.init_params(jax.random.key(0), CFG, init_std=0.1)


def test_prompt_of_real_embeddings_equals_the_model_on_those_tokens(params):
    rng = np.random.default_rng(0)
    prefix = rng.integers(0, CFG.vocab_size, 5)
    tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, (2, 12)), jnp.int32)
    prompt = soft_prompt.init_from_text(params, prefix, 5)
    got = jax.jit(soft_prompt.forward, static_argnums=3)(params, prompt, tokens, CFG)
    full = jnp.concatenate([jnp.broadcast_to(jnp.asarray(prefix, jnp.int32), (2, 5)), tokens], 1)
    want = jax.jit(llama.forward, static_argnums=2)(params, full, CFG)[:, 5:]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)
    # Two packed documents: the second sees the prompt and itself, as if alone after it.
    seg = jnp.asarray(np.repeat([[1] * 7 + [2] * 5], 2, 0), jnp.int32)
    pos = jnp.asarray(np.repeat([list(range(7)) + list(range(5))], 2, 0), jnp.int32)
    packed = jax.jit(soft_prompt.forward, static_argnums=3)(params, prompt, tokens, CFG,
                                                            positions=pos, segment_ids=seg)
    alone = jax.jit(soft_prompt.forward, static_argnums=3)(params, prompt, tokens[:, 7:], CFG)
    np.testing.assert_allclose(np.asarray(packed[:, 7:]), np.asarray(alone), atol=2e-5)


def test_training_changes_only_the_prompt(params):
    before = jax.tree.map(np.array, params)
    prompt = soft_prompt.init_from_vocab(jax.random.key(1), params, 4)
    rng = np.random.default_rng(1)
    x = rng.integers(0, CFG.vocab_size, (4, 17)).astype(np.int32)
    batch = {"inputs": jnp.asarray(x[:, :-1]), "targets": jnp.asarray(x[:, 1:]),
             "segment_ids": jnp.ones((4, 16), jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), (4, 16)),
             "loss_mask": jnp.ones((4, 16), jnp.float32)}
    optimizer = optax.adam(3e-2)
    obj = Objective(loss=soft_prompt.soft_prompt_loss(CFG), inputs=params)
    step = make_train_step(CFG, optimizer, optax.constant_schedule(3e-2), objective=obj)
    state = state_lib.create({soft_prompt.TENSOR: jnp.copy(prompt)}, optimizer, seed=0)
    losses = []
    for _ in range(4):
        state, metrics = step(state, batch, params)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    assert float(jnp.abs(state.params[soft_prompt.TENSOR] - prompt).max()) > 0
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_save_load_and_a_prompt_of_another_width_is_refused(params, tmp_path):
    prompt = soft_prompt.init_from_vocab(jax.random.key(2), params, 3)
    path = soft_prompt.save(prompt, tmp_path / "prompt.safetensors")
    np.testing.assert_array_equal(np.asarray(soft_prompt.load(path, CFG)), np.asarray(prompt))
    wider = CFG.replace(hidden_size=128, intermediate_size=256)
    with pytest.raises(ValueError, match="shape \\(3, 64\\) but this model's hidden size is 128"):
        soft_prompt.load(path, wider)
    with pytest.raises(ValueError, match="non-empty init text"):
        soft_prompt.init_from_text(params, [], 4)


def test_generation_after_a_prompt_of_real_embeddings_continues_those_tokens(params):
    from sparse_llama.model import generate

    prefix = [3, 9, 27, 5]
    prompt = [11, 2, 40]
    soft = soft_prompt.init_from_text(params, prefix, 4)
    got = generate.generate(params, CFG, prompt, max_new_tokens=6, eos_id=[], soft_prompt=soft)
    want = generate.generate(params, CFG, prefix + prompt, max_new_tokens=6, eos_id=[])
    assert got == want
    with pytest.raises(ValueError, match="soft prompt 4 \\+ prompt length 3"):
        generate.generate(params, CFG, prompt, max_new_tokens=60, soft_prompt=soft)


def test_eval_and_generate_commands_take_a_prompt_file(finetune_dirs, tmp_path):
    from configs import eval as eval_configs
    from configs import generate as generate_configs
    from sparse_llama.commands import eval as eval_run
    from sparse_llama.commands import generate as completion
    from sparse_llama.model import hf_io
    from sparse_llama.train.run_setup import resolve_tokenizer

    model_dir, text = finetune_dirs[1], finetune_dirs[3]
    cfg, base = hf_io.load_hf(model_dir)
    config = eval_configs.get_config()
    config.model.hf_path = model_dir
    config.data.update(eval_path=text, seq_len=32)
    plain = eval_run.run(config)
    # A prompt of the embeddings of the text's own first tokens: every window is then scored
    # as if it followed them, which changes (here: the model's) perplexity.
    ids = resolve_tokenizer(config)[0].encode("def f(x):\n    return x + 1\n")
    path = soft_prompt.save(soft_prompt.init_from_text(base, ids, 8), tmp_path / "p.safetensors")
    config.model.soft_prompt = path
    prompted = eval_run.run(config)
    assert prompted["soft_prompt"] == path and prompted["tokens"] == plain["tokens"]
    assert prompted["perplexity"] != pytest.approx(plain["perplexity"], rel=1e-4)
    gen = generate_configs.get_config()
    gen.model.update(hf_path=model_dir, soft_prompt=path)
    gen.update(prompt="def", max_new_tokens=3)
    assert len(completion.run(gen)["tokens"]) <= 3
    soft_prompt.save(np.zeros((8, cfg.hidden_size + 1), np.float32), tmp_path / "wide.safetensors")
    config.model.soft_prompt = str(tmp_path / "wide.safetensors")
    with pytest.raises(ValueError, match="hidden size is 64: a soft prompt only fits"):
        eval_run.run(config)
