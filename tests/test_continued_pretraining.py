"""Continued pretraining on more of a model's own kind of text must not make it worse.

A model trained by the suite (the tiny preset, on a folder of English documents of the
embedded corpus: Python's reference manual, docstrings and text files) is trained further on a
text file of other such documents, once by `commands.train` with the dense
defaults (a small learning rate) and once by a plain torch loop over random windows of the
same tokens with the same optimizer settings and token budget (the reference). Both are
measured on a third, held-out text with `evaluate_text` (wikitext-style windows).

This tiny model, trained for seconds, still gains from any more text, so the former defaults
(every blank-line paragraph a BOS-framed document) did not raise its perplexity here as they
raised a converged model's (44.9 -> 50.7 in the issue), but they gained only half of what
torch gained: start 62.93, ours 61.10, torch 59.55, which the margin below rejects.
"""

import math

import numpy as np
import pytest

from configs import blocks, dense
from sparse_llama import loading
from sparse_llama.commands import train as train_command
from sparse_llama.commands.eval import evaluate_text
from sparse_llama.data import corpus
from sparse_llama.data.tokenizer import default_tokenizer

SEQ_LEN, BATCH = 256, 8
PRETRAIN_STEPS, CONTINUE_STEPS = 120, 40
# Characters of each slice (~2 characters per token of the 512-id BPE): the pretraining
# folder is about one epoch of its steps, the continued-training file holds 2.5x the tokens its
# 40 steps read (so its windows are a sample, as in real continued pretraining).
PRETRAIN_CHARS, CONTINUE_CHARS, HELD_OUT_CHARS = 500_000, 400_000, 60_000
OPTIMIZER = {"lr": 3e-4, "warmup_steps": 4, "min_lr_ratio": 0.1, "weight_decay": 0.1,
             "b1": 0.9, "b2": 0.95, "eps": 1e-8, "clip_norm": 1.0}


def _slices(tmp_path):
    """(folder of pretraining documents, continued-training text file, held-out text file):
    disjoint documents of the embedded prose corpus's training split, in hash order."""
    docs = corpus.train_documents_in_hash_order("prose")

    def take(chars):
        return corpus.take_chars(docs, chars)

    folder = tmp_path / "pretrain"
    folder.mkdir()
    for k, text in enumerate(take(PRETRAIN_CHARS)):
        (folder / f"{k:04d}.txt").write_text(text)
    more, held = tmp_path / "more.txt", tmp_path / "held_out.txt"
    more.write_text("\n\n".join(take(CONTINUE_CHARS)))
    held.write_text("\n\n".join(take(HELD_OUT_CHARS)))
    return folder, more, held


def _config(steps, **data):
    config = dense.get_config("tiny")
    config.data.update(seq_len=SEQ_LEN, **data)
    config.train.update(steps=steps, batch_size=BATCH, eval_batches=0, log_every=10,
                        checkpoint_every=0)
    return config


def _perplexity(hf_dir, tokenizer, text) -> float:
    model = blocks.model()
    model.hf_path = str(hf_dir)
    return evaluate_text(loading.load_model(model), tokenizer, text, SEQ_LEN, batch_size=16,
                         mesh_cfg=blocks.mesh()).perplexity


def _torch_continued(hf_dir, stream: np.ndarray, out_dir, steps: int) -> None:
    """The reference: transformers' Llama, torch AdamW with our settings (decay on all but the
    norm scales, global-norm clipping, linear warmup then cosine to lr * min_lr_ratio), on
    uniformly random windows of `stream`; saved as a Hugging Face directory."""
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.train()
    o = OPTIMIZER
    named = list(model.named_parameters())
    groups = [{"params": [p for n, p in named if "norm" not in n],
               "weight_decay": o["weight_decay"]},
              {"params": [p for n, p in named if "norm" in n], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=o["lr"], betas=(o["b1"], o["b2"]), eps=o["eps"])
    warmup, floor = o["warmup_steps"], o["min_lr_ratio"]

    def lr_factor(step):
        if step < warmup:
            return min(1.0, (step + 1) / warmup)
        progress = min(max((step - warmup) / max(1, steps - warmup), 0.0), 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    rng = np.random.default_rng(0)
    tokens = torch.as_tensor(stream.astype(np.int64))
    for _ in range(steps):
        starts = rng.integers(0, len(stream) - SEQ_LEN, size=BATCH)
        windows = torch.stack([tokens[s:s + SEQ_LEN + 1] for s in starts])
        logits = model(windows[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o["clip_norm"])
        opt.step()
        schedule.step()
    model.save_pretrained(out_dir)


def test_continued_pretraining_does_not_raise_held_out_perplexity(tmp_path):
    pytest.importorskip("transformers")
    folder, more, held = _slices(tmp_path)
    tokenizer = default_tokenizer(512)
    pretrained = train_command.train(_config(PRETRAIN_STEPS, path=str(folder)), str(tmp_path / "a"))
    base = pretrained["hf_dir"]

    config = _config(CONTINUE_STEPS, path=str(more), eval_path=str(held))
    config.model.hf_path = base
    config.optimizer.update(OPTIMIZER)
    ours = train_command.train(config, str(tmp_path / "b"))["hf_dir"]
    stream = np.asarray(tokenizer.encode(more.read_text()), np.int32)
    _torch_continued(base, stream, tmp_path / "torch", CONTINUE_STEPS)

    text = held.read_text()
    start = _perplexity(base, tokenizer, text)
    after_ours = _perplexity(ours, tokenizer, text)
    after_torch = _perplexity(tmp_path / "torch", tokenizer, text)
    print(f"held-out perplexity: start {start:.3f}, ours {after_ours:.3f}, "
          f"torch {after_torch:.3f}")
    assert after_torch < start  # the setup is sound: more of the same text helps
    assert after_ours <= start
    # Same data, optimizer and token budget; only the window sampling differs (our
    # non-overlapping, globally shuffled windows vs uniformly random offsets). Measured:
    # start 55.50, ours 53.33, torch 53.54 (ours/torch 0.996; on code documents 0.9996 and
    # 1.0055): runs are bit-exact, so the spread is the samplers', under 0.6%. 1.5% allows
    # 2.5x that and rejects the former defaults' 1.026.
    assert after_ours <= after_torch * 1.015
