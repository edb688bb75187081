"""Llama architecture configuration and the named presets.

`LlamaConfig` is a frozen dataclass: hashable, so it can be a static argument of `jax.jit`.
Execution switches (`scan_layers`, `remat`, `dtype`, `attention`) live here too because they change how the
forward is traced, not what it computes.
"""

import dataclasses
import math
from typing import Any

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
# "xla": the project's own softmax attention (layers.dot_product_attention); "jax":
# jax.nn.dot_product_attention, which takes cuDNN's fused flash kernel on GPUs where the
# inputs allow it and XLA elsewhere; "splash": JAX's Pallas splash-attention kernels, TPU only
# (sequence a multiple of 128; KV-cache decoding runs xla) (model/layers.py).
ATTENTION_IMPLEMENTATIONS = ("xla", "jax", "splash")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rotary frequency scaling. `kind` is 'llama3' or 'linear' (Hugging Face `rope_type`)."""

    kind: str = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None  # None: hidden_size // num_heads
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    # Execution (not architecture).
    dtype: str = "float32"  # compute dtype; params are cast to it at use
    scan_layers: bool = False  # lax.scan over the stacked layer axis instead of a Python loop
    remat: str = "none"  # rematerialisation policy of each block, see REMAT_POLICIES
    attention: str = "xla"  # attention implementation, see ATTENTION_IMPLEMENTATIONS

    def __post_init__(self):
        problems = []
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads > 0 and self.num_kv_heads > 0 and self.num_heads % self.num_kv_heads:
            problems.append(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                            f"({self.num_kv_heads}) for grouped-query attention")
        if self.head_dim is None and self.num_heads > 0 and self.hidden_size % self.num_heads:
            problems.append(f"hidden_size ({self.hidden_size}) is not divisible by num_heads "
                            f"({self.num_heads}); set head_dim explicitly")
        if self.head_dim is not None and (self.head_dim <= 0 or self.head_dim % 2):
            problems.append(f"head_dim must be a positive even number, got {self.head_dim}")
        if self.dtype not in DTYPES:
            problems.append(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.remat not in REMAT_POLICIES:
            problems.append(f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            problems.append(f"attention must be one of {ATTENTION_IMPLEMENTATIONS}, got "
                            f"{self.attention!r}")
        if self.rope_scaling is not None and self.rope_scaling.kind not in ("llama3", "linear"):
            problems.append(f"rope_scaling kind {self.rope_scaling.kind!r} is not supported "
                            "(supported: 'llama3', 'linear')")
        if problems:
            raise ValueError("invalid LlamaConfig: " + "; ".join(problems))

    @property
    def dim_per_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    @property
    def q_width(self) -> int:
        return self.num_heads * self.dim_per_head

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.dim_per_head

    def replace(self, **changes: Any) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)


def check_context(seq_len: int, config: LlamaConfig, key: str = "data.seq_len") -> None:
    """Refuse windows longer than the model's context, naming the config key to lower."""
    if seq_len > config.max_position_embeddings:
        raise ValueError(f"{key}={seq_len} exceeds the model's context of "
                         f"{config.max_position_embeddings} tokens (max_position_embeddings); "
                         f"set --config.{key} to at most {config.max_position_embeddings}")


def param_count(config: LlamaConfig) -> int:
    """Number of parameters, by formula (tests check it against `jax.eval_shape`)."""
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    attn = d * config.q_width * 2 + d * config.kv_width * 2
    block = attn + 3 * d * f + 2 * d
    head = 0 if config.tie_word_embeddings else d * v
    return v * d + config.num_layers * block + d + head


def matmul_flops_per_token(config: LlamaConfig, seq_len: int) -> float:
    """Forward FLOPs per token: 2 * (matmul params) plus causal attention scores and values."""
    d, f = config.hidden_size, config.intermediate_size
    dense = 2 * (d * config.q_width * 2 + d * config.kv_width * 2 + 3 * d * f)
    # QK^T and AV over a causal window: on average seq_len / 2 keys per query.
    attention = 2 * 2 * config.q_width * seq_len / 2
    return config.num_layers * (dense + attention) + 2 * d * config.vocab_size


_LLAMA3_ROPE = RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)

PRESETS: dict[str, LlamaConfig] = {
    "tiny": LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=176, num_layers=2,
                        num_heads=4, num_kv_heads=2, max_position_embeddings=512),
    # Deep enough for layerwise profiles (OWL) to matter, small enough to train in a test.
    "mini": LlamaConfig(vocab_size=512, hidden_size=96, intermediate_size=256, num_layers=4,
                        num_heads=4, num_kv_heads=2, max_position_embeddings=512),
    "m25": LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1536, num_layers=6,
                       num_heads=8, num_kv_heads=8, max_position_embeddings=1024),
    "small": LlamaConfig(vocab_size=8192, hidden_size=256, intermediate_size=688, num_layers=4,
                         num_heads=8, num_kv_heads=4, max_position_embeddings=1024),
    "m100": LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048,
                        num_layers=8, num_heads=12, num_kv_heads=12,
                        max_position_embeddings=2048),
    "llama2_7b": LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                             num_layers=32, num_heads=32, num_kv_heads=32,
                             max_position_embeddings=4096, scan_layers=True, remat="dots"),
    "llama2_13b": LlamaConfig(vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                              num_layers=40, num_heads=40, num_kv_heads=40,
                              max_position_embeddings=4096, scan_layers=True, remat="dots"),
    "llama2_70b": LlamaConfig(vocab_size=32000, hidden_size=8192, intermediate_size=28672,
                              num_layers=80, num_heads=64, num_kv_heads=8,
                              max_position_embeddings=4096, scan_layers=True, remat="dots"),
    "llama3_8b": LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                             num_layers=32, num_heads=32, num_kv_heads=8, rope_theta=500000.0,
                             rope_scaling=_LLAMA3_ROPE, max_position_embeddings=131072,
                             bos_token_id=128000, eos_token_id=128001, scan_layers=True,
                             remat="dots"),
}


def preset(name: str) -> LlamaConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def rope_inverse_frequencies(config: LlamaConfig):
    """Per-pair rotary inverse frequencies (numpy, float64), with the configured scaling."""
    import numpy as np

    dim = config.dim_per_head
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled)
