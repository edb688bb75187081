"""Sparse recovery: our sparse continued pretraining next to the textbook torch recipe (CPU).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/sparse_recovery.py

A tiny Llama (preset tiny) is trained dense on a text file of standard-library modules
(`commands.train`, configs/dense.py:tiny, seeded), exported, then pruned one-shot with SparseGPT to
50% and to 70% (`commands.prune.run`, calibration windows of the same text). Each pruned model is
then trained further on the same text with the same optimizer settings and token budget twice:

  ours   `commands.train` with configs/sparse.py:tiny (keep-sparse AdamW, masks from PRUNED/masks);
  torch  `torch_recovery` below: transformers' LlamaForCausalLM, masks = (weight != 0) of every
         q/k/v/o/gate/up/down, and per step: loss.backward(), grads *= mask, clip_grad_norm_,
         AdamW.step() (decay on every matrix, embeddings and lm_head included, not on the norm
         scales), LambdaLR step (linear warmup from lr / warmup, cosine to lr * min_lr_ratio),
         weights *= mask. Its data: the text framed and tokenized as ours does it
         ([BOS] text EOS, the model's tokenizer), cut into non-overlapping windows of
         seq_len + 1 tokens (seq_len predictions each, as ours), a new random permutation each
         epoch, batch_size windows per step. Only the permutation differs from ours;
         torch_same_order_ppl is torch trained once more on exactly ours' batches.
         (`torch_recovery(windows="random")`: rows at random offsets instead, nanoGPT's
         sampling; benchmarks/sparse_recovery_file.py compares both on a file of your own.)

Every perplexity is `sparse_llama.commands.eval.evaluate_text` (what `launch.eval` computes) on a
held-out text of other modules. seconds: wall time of the whole recipe (load, train, export),
compile included; tokens_per_s: steady state (ours: the loop's summary, compile excluded;
torch: from its second step on, on TORCH_THREADS threads). speedup = torch seconds / ours
seconds. The last stdout line is {"benchmark": "sparse_recovery", "rows": [...]}.
"""

import glob
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from peak_report import emit

from configs import blocks, dense, prune, sparse
from sparse_llama import loading
from sparse_llama.commands import prune as prune_run
from sparse_llama.commands import train as train_command
from sparse_llama.commands.eval import evaluate_text
from sparse_llama.data import corpus
from sparse_llama.data.tokenizer import load_tokenizer
from sparse_llama.sparsity.masks import DEFAULT_TARGETS

SEQ_LEN, BATCH = 128, 16  # configs/sparse.py:tiny
SPARSITIES = (0.5, 0.7)
# Characters of each text (~2 characters per token of the 512-id BPE on code): the training
# text is ~0.75M tokens, so the recovery budget (300 x 16 x 128 = 0.6M) is under one epoch.
TRAIN_CHARS, HELD_OUT_CHARS = 1_500_000, 150_000
DENSE_STEPS = 600  # half of configs/dense.py:tiny's 1200 (its other settings as they are)
# torch's intra-op threads. On a shared 2-core CPU (load average ~14) a step with torch's default
# 2 OpenMP threads took 1.3-3.2 s against 0.22-0.32 s with one thread, so the reference runs
# single-threaded; SPARSE_RECOVERY_TORCH_THREADS=0 gives torch's default.
TORCH_THREADS = int(os.environ.get("SPARSE_RECOVERY_TORCH_THREADS", "1"))
OPTIMIZER_KEYS = ("lr", "warmup_steps", "min_lr_ratio", "weight_decay", "b1", "b2", "eps",
                  "clip_norm")


def texts(train_chars: int, held_out_chars: int) -> tuple[str, str]:
    """(training text, held-out text): disjoint modules of the embedded code corpus's training
    split, in hash order."""
    docs = corpus.train_documents_in_hash_order("code")

    def take(chars):
        return "\n\n".join(corpus.take_chars(docs, chars))

    return take(train_chars), take(held_out_chars)


def train_dense(train_path: str, workdir: str, steps: int, seed: int = 0) -> str:
    """A dense tiny model trained on `train_path`; returns its Hugging Face directory."""
    config = dense.get_config("tiny")
    config.data.path = train_path
    config.data.seq_len = SEQ_LEN
    config.train.update(steps=steps, seed=seed, eval_batches=0, checkpoint_every=0,
                        log_every=50)
    config.optimizer.warmup_steps = min(config.optimizer.warmup_steps, max(1, steps // 10))
    return train_command.train(config, workdir)["hf_dir"]


def prune_model(hf_dir: str, out_dir: str, sparsity: float, calibration_path: str, *,
                num_samples: int = 128, seq_len: int = SEQ_LEN) -> dict:
    """SparseGPT to `sparsity` (uniform, unstructured); returns the prune summary."""
    config = prune.get_config("sparsegpt50")
    config.model.hf_path = hf_dir
    config.output_dir = out_dir
    config.pruning.sparsity = sparsity
    config.calibration.update(path=calibration_path, num_samples=num_samples, seq_len=seq_len)
    return prune_run.run(config)


def sparse_config(pruned: str, train_path: str, eval_path: str, steps: int):
    """configs/sparse.py:tiny on `train_path` for `steps` updates, without in-loop eval."""
    config = sparse.get_config("tiny")
    config.model.hf_path = pruned
    config.data.update(path=train_path, eval_path=eval_path, seq_len=SEQ_LEN)
    config.train.update(steps=steps, batch_size=BATCH, eval_batches=0, checkpoint_every=0,
                        log_every=50)
    config.optimizer.warmup_steps = min(config.optimizer.warmup_steps, max(1, steps // 10))
    return config


def ours_recovery(config, workdir: str) -> dict:
    """`train_command.train(config)`; its summary plus "seconds" (wall, compile and export included)."""
    start = time.perf_counter()
    summary = train_command.train(config, workdir)
    return {**summary, "seconds": time.perf_counter() - start}


def lr_factor(step: int, warmup: int, total_steps: int, floor: float) -> float:
    """optim/factory.learning_rate_schedule / lr, written out: lr * (step + 1) / warmup, then
    cosine from lr to lr * floor at total_steps."""
    if step < warmup:
        return min(1.0, (step + 1) / max(1, warmup))
    progress = min(max((step - warmup) / max(1, total_steps - warmup), 0.0), 1.0)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def window_starts(stream_len: int, seq_len: int, batch_size: int, *, seed: int = 0,
                  windows: str = "permuted", order: np.ndarray | None = None
                  ) -> Iterator[np.ndarray]:
    """The first-token offsets (batch_size,) of each step's rows of seq_len + 1 tokens, forever.

    "permuted": the non-overlapping windows k * seq_len, k < (stream_len - 1) // seq_len, a
    fresh numpy permutation each epoch (or the window indices `order`, in order, when given).
    "random": uniform offsets in [0, stream_len - seq_len - 1], every row inside the stream.
    """
    if windows not in ("permuted", "random"):
        raise ValueError(f"windows must be 'permuted' or 'random', got {windows!r}")
    rng = np.random.default_rng(seed)

    def given():
        picked = np.asarray(order, np.int64)
        for k in range(0, len(picked) - batch_size + 1, batch_size):
            yield picked[k:k + batch_size] * seq_len

    def random():
        while True:
            yield rng.integers(0, stream_len - seq_len, size=batch_size)

    def permuted():
        pending = np.empty(0, np.int64)
        while True:
            if len(pending) < batch_size:  # a new epoch: a fresh permutation
                pending = np.concatenate([pending, rng.permutation((stream_len - 1) // seq_len)])
            yield pending[:batch_size] * seq_len
            pending = pending[batch_size:]

    if order is not None:
        return given()
    return random() if windows == "random" else permuted()


def torch_recovery(pruned: str, stream: np.ndarray, out_dir: str, *, steps: int,
                   batch_size: int, seq_len: int, optimizer: dict, seed: int = 0,
                   threads: int = 0, order: np.ndarray | None = None,
                   windows: str = "permuted") -> dict:
    """The textbook recipe: masked gradients before AdamW, weights re-zeroed after each step.

    `stream`: the training tokens (1-D int), cut into non-overlapping windows of seq_len + 1
    (inputs w[:-1], targets w[1:]), reshuffled every epoch. `optimizer`: configs/blocks.py's
    optimizer keys. `threads`: torch's intra-op threads (0: torch's default). `order`: window
    indices to train on instead of the permutations, `steps * batch_size` of them (e.g.
    `ours_window_order`: the same batches as ours, to tell data order from the recipe; the
    last, partial window may be among them, its missing targets ignored). `windows`:
    "permuted" (the above) or "random": every row starts at a uniform random offset of the
    stream, seq_len + 1 tokens fully inside it (nanoGPT's `get_batch`). Saves a Hugging Face
    directory (tokenizer files of `pruned` copied) and returns {"seconds",
    "tokens_per_s", "loss"} (loss: mean of the last 50 steps).
    """
    import torch
    import transformers

    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM.from_pretrained(pruned, dtype=torch.float32)
    model.train()
    named = list(model.named_parameters())
    masks = {n: (p.detach() != 0) for n, p in named
             if n.rsplit(".", 2)[-2] in DEFAULT_TARGETS and n.endswith(".weight")}
    if len(masks) != 7 * model.config.num_hidden_layers:
        raise ValueError(f"expected 7 masked matrices per layer, found {sorted(masks)}")
    o = optimizer
    groups = [{"params": [p for n, p in named if "norm" not in n],
               "weight_decay": float(o["weight_decay"])},
              {"params": [p for n, p in named if "norm" in n], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=float(o["lr"]), betas=(float(o["b1"]), float(o["b2"])),
                            eps=float(o["eps"]))
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(
        s, int(o["warmup_steps"]), steps, float(o["min_lr_ratio"])))
    params = dict(named)

    num_windows = (len(stream) - 1) // seq_len
    if num_windows < batch_size:
        raise ValueError(f"{len(stream)} tokens make {num_windows} windows of {seq_len}, "
                         f"fewer than batch_size={batch_size}")
    # Padded by a window so the partial tail window (index num_windows) can be read; targets
    # past the stream's end are ignored by the loss (-100), as ours' loss_mask does.
    tokens = torch.as_tensor(np.concatenate([np.asarray(stream, np.int64),
                                             np.zeros(seq_len + 1, np.int64)]))
    last_target = len(stream) - 1
    offsets = torch.arange(seq_len + 1)
    losses, timed_from = [], None
    batches = window_starts(len(stream), seq_len, batch_size, seed=seed, windows=windows,
                            order=order)
    for step in range(steps):
        index = torch.as_tensor(next(batches))[:, None] + offsets
        rows = tokens[index]
        targets = torch.where(index[:, 1:] > last_target, -100, rows[:, 1:])
        logits = model(input_ids=rows[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(),
                                                 targets.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for name, mask in masks.items():
            params[name].grad.mul_(mask)
        if float(o["clip_norm"]) > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), float(o["clip_norm"]))
        opt.step()
        schedule.step()
        with torch.no_grad():
            for name, mask in masks.items():
                params[name].mul_(mask)
        losses.append(loss.item())
        if step == 0:
            timed_from = time.perf_counter()
    train_end = time.perf_counter()
    model.save_pretrained(out_dir)
    for f in os.listdir(pruned):
        if "token" in f and os.path.isfile(os.path.join(pruned, f)):
            shutil.copy(os.path.join(pruned, f), out_dir)
    timed_steps = steps - 1
    tps = (timed_steps * batch_size * seq_len / (train_end - timed_from)
           if timed_steps else float("nan"))
    return {"seconds": time.perf_counter() - start, "tokens_per_s": tps,
            "loss": float(np.mean(losses[-50:]))}


def ours_window_order(config, tokenizer, stream: np.ndarray) -> np.ndarray:
    """The windows (indices k of stream[k * seq_len : (k + 1) * seq_len + 1]) that our
    pipeline gives `train_command.train(config)`, in order, for all its steps (one process)."""
    from sparse_llama.data import pipeline

    seq_len, t = config.data.seq_len, config.train
    it = pipeline.train_iterator(config.data, tokenizer, seq_len=seq_len,
                                 global_batch_size=t.batch_size, seed=t.seed,
                                 process_index=0, process_count=1)
    stream = np.asarray(stream, np.int64)
    num_windows = (len(stream) - 1) // seq_len
    # A window is known by its inputs and targets (a repeated stretch of text is one key:
    # the same training rows either way).
    index = {stream[k * seq_len:(k + 1) * seq_len + 1].tobytes(): k for k in range(num_windows)}
    # The partial last window: its inputs, zero-padded, then its padded last target (0).
    tail = np.zeros(seq_len + 1, np.int64)
    tail[:len(stream) - 1 - num_windows * seq_len] = stream[num_windows * seq_len:-1]
    index.setdefault(tail.tobytes(), num_windows)
    order = []
    for _ in range(t.steps):
        batch = next(it)
        inputs = np.asarray(batch["inputs"], np.int64)
        targets = np.asarray(batch["targets"], np.int64)
        for x, y in zip(inputs, targets, strict=True):
            order.append(index[np.concatenate([x, y[-1:]]).tobytes()])
    return np.asarray(order, np.int64)


def train_stream(text: str, tokenizer) -> np.ndarray:
    """The text as our pipeline frames a plain text file: [BOS] ids EOS (BOS if any)."""
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    return np.asarray([*bos, *tokenizer.encode(text), tokenizer.eos_id], np.int64)


def perplexity(hf_dir: str, tokenizer, text: str, seq_len: int = SEQ_LEN) -> float:
    """Held-out perplexity as `launch.eval` computes it (float32, batch 8)."""
    model_cfg = blocks.model()
    model_cfg.hf_path = str(hf_dir)
    return evaluate_text(loading.load_model(model_cfg), tokenizer, text, seq_len, batch_size=8,
                         mesh_cfg=blocks.mesh()).perplexity


def target_tensors(hf_dir: str) -> dict[str, np.ndarray]:
    """The q/k/v/o/gate/up/down weights of a Hugging Face directory's safetensors files."""
    from safetensors.numpy import load_file

    out = {}
    for file in sorted(glob.glob(os.path.join(hf_dir, "*.safetensors"))):
        for name, w in load_file(file).items():
            parts = name.split(".")
            if len(parts) >= 2 and parts[-2] in DEFAULT_TARGETS and parts[-1] == "weight":
                out[name] = w
    return out


def zero_fraction(hf_dir: str) -> float:
    """Fraction of exact zeros over all target weights of `hf_dir`."""
    tensors = target_tensors(hf_dir)
    zeros = sum(int(np.sum(w == 0)) for w in tensors.values())
    return zeros / sum(w.size for w in tensors.values())


def compare(pruned: str, train_path: str, eval_path: str, tokenizer, stream: np.ndarray,
            workdir: str, *, steps: int, torch_threads: int = 0, same_order: bool = True
            ) -> dict:
    """Ours and torch from `pruned` with the same settings and budget, both measured on
    `eval_path`; the numbers of one result row. `same_order`: torch once more on exactly
    ours' batches (`ours_window_order`), "torch_same_order_ppl": what is left of the gap
    between ours and torch there is the recipe, the rest is the order of the windows."""
    config = sparse_config(pruned, train_path, eval_path, steps)
    eval_text = Path(eval_path).read_text()
    ours = ours_recovery(config, os.path.join(workdir, "ours"))
    opt = {k: config.optimizer[k] for k in OPTIMIZER_KEYS}
    torch_dir = os.path.join(workdir, "torch")
    ref = torch_recovery(pruned, stream, torch_dir, steps=steps,
                         batch_size=config.train.batch_size, seq_len=config.data.seq_len,
                         optimizer=opt, seed=config.train.seed, threads=torch_threads)
    same = {}
    if same_order:
        same_dir = os.path.join(workdir, "torch_same_order")
        torch_recovery(pruned, stream, same_dir, steps=steps,
                       batch_size=config.train.batch_size, seq_len=config.data.seq_len,
                       optimizer=opt, threads=torch_threads,
                       order=ours_window_order(config, tokenizer, stream))
        same = {"torch_same_order_ppl": perplexity(same_dir, tokenizer, eval_text),
                "torch_same_order_hf_dir": same_dir}
    return {
        **same,
        "ours_ppl": perplexity(ours["hf_dir"], tokenizer, eval_text),
        "torch_ppl": perplexity(torch_dir, tokenizer, eval_text),
        "ours_sparsity": zero_fraction(ours["hf_dir"]),
        "torch_sparsity": zero_fraction(torch_dir),
        "ours_loss": ours["loss"], "torch_loss": ref["loss"],
        "ours_seconds": ours["seconds"], "torch_seconds": ref["seconds"],
        "ours_tokens_per_s": ours["tokens_per_s"], "torch_tokens_per_s": ref["tokens_per_s"],
        "ours_hf_dir": ours["hf_dir"], "torch_hf_dir": torch_dir,
        "tokens": steps * config.train.batch_size * config.data.seq_len,
    }


def main() -> None:
    root = tempfile.mkdtemp(prefix="sparse_recovery_")
    train_text, held_out = texts(TRAIN_CHARS, HELD_OUT_CHARS)
    train_path, eval_path = os.path.join(root, "train.txt"), os.path.join(root, "held_out.txt")
    Path(train_path).write_text(train_text)
    Path(eval_path).write_text(held_out)
    start = time.perf_counter()
    dense_dir = train_dense(train_path, os.path.join(root, "dense"), DENSE_STEPS)
    dense_seconds = time.perf_counter() - start
    tokenizer = load_tokenizer(dense_dir)
    stream = train_stream(train_text, tokenizer)
    dense_ppl = perplexity(dense_dir, tokenizer, held_out)
    steps = sparse.get_config("tiny").train.steps
    rows = []
    for target in SPARSITIES:
        work = os.path.join(root, f"s{round(target * 100)}")
        pruned = os.path.join(work, "pruned")
        summary = prune_model(dense_dir, pruned, target, train_path)
        one_shot = perplexity(pruned, tokenizer, held_out)
        r = compare(pruned, train_path, eval_path, tokenizer, stream, work, steps=steps,
                    torch_threads=TORCH_THREADS)
        rows.append({
            "sparsity": round(summary["sparsity"], 4), "dense_ppl": round(dense_ppl, 3),
            "one_shot_ppl": round(one_shot, 3), "ours_ppl": round(r["ours_ppl"], 3),
            "torch_ppl": round(r["torch_ppl"], 3),
            "torch_same_order_ppl": round(r["torch_same_order_ppl"], 3),
            "ours_recovered": round(one_shot - r["ours_ppl"], 3),
            "torch_recovered": round(one_shot - r["torch_ppl"], 3),
            "ours_sparsity": round(r["ours_sparsity"], 4),
            "torch_sparsity": round(r["torch_sparsity"], 4),
            "ours_loss": round(r["ours_loss"], 4), "torch_loss": round(r["torch_loss"], 4),
            "ours_seconds": round(r["ours_seconds"], 1),
            "torch_seconds": round(r["torch_seconds"], 1),
            "ours_tokens_per_s": round(r["ours_tokens_per_s"]),
            "torch_tokens_per_s": round(r["torch_tokens_per_s"]),
            "tokens": r["tokens"], "steps": steps,
            "speedup": round(r["torch_seconds"] / r["ours_seconds"], 3),
        })
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    shutil.rmtree(root, ignore_errors=True)
    emit("sparse_recovery", rows,
         ["sparsity", "dense_ppl", "one_shot_ppl", "ours_ppl", "torch_ppl",
          "torch_same_order_ppl", "ours_seconds", "torch_seconds", "speedup"],
         dense_steps=DENSE_STEPS, dense_seconds=round(dense_seconds, 1),
         train_tokens=int(stream.size), held_out_chars=len(held_out),
         torch_threads=TORCH_THREADS, load_average=round(os.getloadavg()[0], 1))


if __name__ == "__main__":
    main()
