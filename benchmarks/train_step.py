"""Tokens/s of our jitted train step next to transformers + torch AdamW (CPU), float32.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/train_step.py

Both sides run the same model (our weights exported with hf_io and loaded by transformers,
sdpa attention) on the same (batch, seq_len) tokens with the same number of threads, and do
the same work per step: forward, float32 cross-entropy, backward, global-norm clipping and an
AdamW update. Ours is `sparse_llama.train.step.make_train_step` on one CPU device, exactly as
`launch.train` runs it on a laptop.

peak_fraction = achieved model FLOP/s (3 x forward FLOPs per token from
`config.matmul_flops_per_token`, attention included, x tokens/s) divided by the FLOP/s of one
plain jitted `jnp.dot` of the model's largest matmul shape, measured in the same run (this
CPU's practical matmul peak). After a compile/warm-up step, our step and the reference step
alternate (so both see the same background load) and each reports its fastest step: on a
shared CPU the median mostly measures the other processes. The last stdout line is
{"benchmark": "train_step", "rows": [...]}.
"""

import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from peak_report import emit, matmul_peak

from configs import blocks
from sparse_llama.model import hf_io, llama
from sparse_llama.model.config import LlamaConfig, matmul_flops_per_token, preset
from sparse_llama.optim.factory import make_optimizer
from sparse_llama.train import state as state_lib
from sparse_llama.train.step import make_train_step

# config -> (model, batch, seq_len). m25: 24.6M params with a 4096-token vocabulary.
CONFIGS = {
    "tiny": (preset("tiny"), 16, 128),
    "m25": (preset("m25"), 8, 256),
}

def fastest(fns: list, rounds: int = 3, steps: int = 4) -> list[float]:
    """Seconds of the fastest call of each fn, after one warm-up call each.

    The fns take turns in blocks of `steps` calls (`rounds` times), so they see the same
    background load, while the first call of a block absorbs the other library's idle worker
    threads (torch's OpenMP and XLA's pools spin for a while after their work).
    """
    for fn in fns:
        fn()  # compile / allocate
    times = [[] for _ in fns]
    for _ in range(rounds):
        for fn, t in zip(fns, times, strict=True):
            for _ in range(steps):
                start = time.perf_counter()
                fn()
                t.append(time.perf_counter() - start)
    return [min(t) for t in times]


def make_batch(config: LlamaConfig, batch: int, seq_len: int) -> dict:
    x = np.random.default_rng(0).integers(0, config.vocab_size, (batch, seq_len + 1))
    return {"inputs": x[:, :-1].astype(np.int32), "targets": x[:, 1:].astype(np.int32),
            "segment_ids": np.ones((batch, seq_len), np.int32),
            "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)),
            "loss_mask": np.ones((batch, seq_len), np.float32)}


def ours(config: LlamaConfig, params: dict, batch: dict, opt_cfg):
    """(one training step as a callable, {"loss": first loss} once it ran)."""
    optimizer, schedule = make_optimizer(opt_cfg, total_steps=1000)
    step = make_train_step(config, optimizer, schedule)
    state = state_lib.create(jax.tree.map(jnp.copy, params), optimizer, seed=0)
    device_batch = jax.tree.map(jnp.asarray, batch)
    holder = {"state": state}
    first = {}

    def run():
        holder["state"], metrics = step(holder["state"], device_batch)
        loss = float(metrics["loss"])  # blocks until the step is done
        first.setdefault("loss", loss)

    return run, first


def reference(config: LlamaConfig, params: dict, batch: dict, opt_cfg):
    """transformers + torch.optim.AdamW doing the same step, like `ours`."""
    with tempfile.TemporaryDirectory() as tmp:
        hf_io.save_hf(jax.device_get(params), config, tmp)
        model = transformers.LlamaForCausalLM.from_pretrained(
            tmp, dtype=torch.float32, attn_implementation="sdpa")
    model.train()
    decay = [p for n, p in model.named_parameters() if "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if "norm" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": opt_cfg.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=opt_cfg.lr, betas=(opt_cfg.b1, opt_cfg.b2), eps=opt_cfg.eps)
    inputs = torch.from_numpy(batch["inputs"].astype(np.int64))
    targets = torch.from_numpy(batch["targets"].astype(np.int64))
    first = {}

    def run():
        logits = model(inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opt_cfg.clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        first.setdefault("loss", float(loss))

    return run, first


def bench(name: str, peak: float) -> dict:
    config, batch_size, seq_len = CONFIGS[name]
    params = llama.init_params(jax.random.key(0), config)
    batch = make_batch(config, batch_size, seq_len)
    opt_cfg = blocks.optimizer(lr=1e-3)
    ours_step, ours_first = ours(config, params, batch, opt_cfg)
    ref_step, ref_first = reference(config, params, batch, opt_cfg)
    ours_s, ref_s = fastest([ours_step, ref_step])
    tokens = batch_size * seq_len
    flops = 3 * matmul_flops_per_token(config, seq_len) * tokens
    return {"config": name, "params_m": round(llama.count_params(params) / 1e6, 1),
            "batch": batch_size, "seq_len": seq_len,
            "ours_tokens_per_s": round(tokens / ours_s, 1),
            "reference_tokens_per_s": round(tokens / ref_s, 1),
            "speedup": round(ref_s / ours_s, 3),
            "peak_fraction": round(flops / ours_s / peak, 3),
            "reference_peak_fraction": round(flops / ref_s / peak, 3),
            "first_loss_diff": round(abs(ours_first["loss"] - ref_first["loss"]), 6)}


def main():
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    config, batch_size, seq_len = CONFIGS["m25"]
    m = batch_size * seq_len
    # The m25 step's largest matmul shapes (MLP and output projection); the faster is the peak.
    peak = matmul_peak([(m, config.hidden_size, config.intermediate_size),
                        (m, config.hidden_size, config.vocab_size)])
    rows = [bench(name, peak) for name in CONFIGS]
    print(f"threads={threads}  devices={jax.devices()}  jnp.dot peak: {peak / 1e9:.1f} GFLOP/s")
    emit("train_step", rows, ["config", "params_m", "batch", "seq_len", "ours_tokens_per_s",
                              "reference_tokens_per_s", "speedup", "peak_fraction",
                              "reference_peak_fraction", "first_loss_diff"],
         threads=threads, matmul_peak_gflops=round(peak / 1e9, 2))

if __name__ == "__main__":
    main()
