"""Tokens/s of the jitted forward next to transformers' LlamaForCausalLM (torch, CPU), f32.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/forward.py

Both run the same weights on the same (batch, seq_len) tokens with the same number of threads.
peak_fraction = achieved model FLOP/s (config.matmul_flops_per_token x tokens/s) divided by the
FLOP/s of one plain `jnp.dot` of a similar size measured in the same run (this CPU's practical
matmul peak). The last stdout line is {"benchmark": "forward", "rows": [...]}.
"""

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from peak_report import emit, matmul_peak

from sparse_llama.model import hf_config, llama
from sparse_llama.model.config import matmul_flops_per_token, preset

SHAPES = {"tiny": (8, 128), "m100": (4, 256)}  # config -> (batch, seq_len)


def best_time(fn, repeats: int = 5) -> float:
    fn()  # warm-up (compile / allocate)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def to_hf_model(params, config) -> transformers.LlamaForCausalLM:
    hf = transformers.LlamaConfig(**hf_config.config_to_hf(config),
                                  attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(hf).eval()
    state = {"model.embed_tokens.weight": params["embed_tokens"], "model.norm.weight":
             params["norm"], "lm_head.weight": params["lm_head"].T}
    for i in range(config.num_layers):
        block = llama.layer_params(params, i)
        for group in ("self_attn", "mlp"):
            for name, w in block[group].items():
                state[f"model.layers.{i}.{group}.{name}.weight"] = w.T
        for name in ("input_layernorm", "post_attention_layernorm"):
            state[f"model.layers.{i}.{name}.weight"] = block[name]
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
    return model


def bench(name: str, peak: float) -> dict:
    config = preset(name)
    batch, seq_len = SHAPES[name]
    params = llama.init_params(jax.random.key(0), config)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (batch, seq_len))
    forward = jax.jit(llama.forward, static_argnums=2)
    jtokens = jnp.asarray(tokens, jnp.int32)
    ours = best_time(lambda: forward(params, jtokens, config).block_until_ready())
    model = to_hf_model(params, config)
    ttokens = torch.from_numpy(tokens)
    with torch.inference_mode():
        ref_logits = model(ttokens).logits.numpy()
        reference = best_time(lambda: model(ttokens).logits)
    err = float(np.max(np.abs(np.asarray(forward(params, jtokens, config)) - ref_logits)))
    n_tokens = batch * seq_len
    flops = matmul_flops_per_token(config, seq_len) * n_tokens
    return {"config": name, "batch": batch, "seq_len": seq_len,
            "params_m": round(llama.count_params(params) / 1e6, 1),
            "ours_tokens_per_s": round(n_tokens / ours, 1),
            "reference_tokens_per_s": round(n_tokens / reference, 1),
            "speedup": round(reference / ours, 3),
            "peak_fraction": round(flops / ours / peak, 3),
            "reference_peak_fraction": round(flops / reference / peak, 3),
            "max_abs_logit_diff": err}


def main():
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    # The m100 forward's two largest matmul shapes; the faster one is this CPU's peak.
    peak = matmul_peak([(1024, 768, 2048), (1024, 768, 32000)])
    rows = [bench(name, peak) for name in SHAPES]
    print(f"threads={threads}  jnp.dot peak: {peak / 1e9:.1f} GFLOP/s")
    emit("forward", rows, ["config", "params_m", "batch", "seq_len", "ours_tokens_per_s",
                           "reference_tokens_per_s", "speedup", "peak_fraction",
                           "reference_peak_fraction"],
         threads=threads, matmul_peak_gflops=round(peak / 1e9, 2))

if __name__ == "__main__":
    main()
