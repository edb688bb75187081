"""Tiny Hugging Face Llama checkpoints and tokenizers for tests.

    model = build_hf_model(hidden_size=48, num_attention_heads=6, num_key_value_heads=2)
    ckpt = save_hf_checkpoint(model, tmp_path / "ckpt")       # + tokenizer.json & config
    logits = hf_logits(model, tokens)                        # (b, t, V) float32 numpy

Everything is tiny (2 layers, vocab 101) so building and saving take milliseconds; torch and
transformers are imported here only, so tests that do not use them stay light.
"""

import json
from pathlib import Path

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

TINY = {
    "vocab_size": 101,
    "hidden_size": 48,
    "intermediate_size": 80,
    "num_hidden_layers": 2,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-5,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    # Wider than Llama's 0.02, so that random logits are well separated and greedy decoding
    # does not hinge on float rounding near ties.
    "initializer_range": 0.1,
}
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32,
               "rope_theta": 500000.0}
# Llama-3 scaling whose smoothing band (original / high_freq_factor, original /
# low_freq_factor) = (8, 64) holds two of the wavelengths 2 pi theta^(2i/d) of head_dim 16 at
# theta 1e4 (19.9 and 62.8): there the frequency is interpolated between scaled and unscaled.
# LLAMA3_ROPE's wavelengths (head_dim 8, theta 5e5: 6.3, 167, ...) all miss its band (8, 32).
LLAMA3_ROPE_BAND = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 8.0, "original_max_position_embeddings": 64,
                    "rope_theta": 10000.0}
SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "sparse models keep only the weights that matter",
    "a llama walks into a bar and orders a sparse matrix",
    "pruning removes half of the weights in every layer",
]
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2: pad/unk, bos, eos of TINY


def hf_config(**overrides) -> transformers.LlamaConfig:
    """A tiny transformers LlamaConfig: TINY updated with `overrides` (HF key names).

    `rope_parameters=LLAMA3_ROPE` gives Llama-3 rotary scaling.
    """
    kwargs = {**TINY, **overrides}
    # Mean of every norm scale is 1 in HF init; eager attention matches ours op for op.
    return transformers.LlamaConfig(attn_implementation="eager", **kwargs)


def build_hf_model(seed: int = 0, **overrides) -> transformers.LlamaForCausalLM:
    """A random float32 LlamaForCausalLM in eval mode; norm scales randomised too (HF inits
    them to ones, which would hide a norm-weight mix-up)."""
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(hf_config(**overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def train_tokenizer(vocab_size: int = TINY["vocab_size"]) -> Tokenizer:
    """A word-level-pretokenized BPE trained on SENTENCES, with at most `vocab_size` tokens."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  show_progress=False)
    tok.train_from_iterator(SENTENCES, trainer=trainer)
    return tok


def save_tokenizer(out_dir: str | Path, tokenizer: Tokenizer | None = None) -> Path:
    """tokenizer.json + tokenizer_config.json that `AutoTokenizer.from_pretrained` loads."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (tokenizer or train_tokenizer()).save(str(out / "tokenizer.json"))
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
                  "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>",
                  "model_max_length": TINY["max_position_embeddings"]}
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    return out


def save_hf_checkpoint(model: transformers.LlamaForCausalLM, out_dir: str | Path, *,
                       tokenizer: bool = True, **save_kwargs) -> Path:
    """`model.save_pretrained(out_dir)` plus (by default) a tiny tokenizer beside it."""
    out = Path(out_dir)
    model.save_pretrained(out, **save_kwargs)
    if tokenizer:
        save_tokenizer(out)
    return out


def random_tokens(batch: int, length: int, vocab: int = TINY["vocab_size"], seed: int = 0
                  ) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (batch, length), dtype=np.int32)


def hf_logits(model: transformers.LlamaForCausalLM, tokens: np.ndarray) -> np.ndarray:
    """Logits (b, t, V) as float32 numpy."""
    with torch.no_grad():
        out = model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits
    return out.float().numpy()


def load_hf_model(path: str | Path, dtype=torch.float32) -> transformers.LlamaForCausalLM:
    return transformers.LlamaForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation="eager").eval()
