"""`launch.eval`: perplexity of a model on a text file or a set of documents, from a config.

What `data.eval_path` is decides how it is cut into windows (`eval_tokens`):
  a text file           wikitext-style: the whole file is tokenized once, no BOS inserted.
  .jsonl / .parquet     documents read by the training sources (`text_field`); so is a folder
  (file or folder),     of text files (one document per file). Each document is framed as
  a folder of text      training frames it, `[BOS] text [EOS]` (BOS when the tokenizer has
                        one), and the framed documents are concatenated in order.
Either stream is then cut into non-overlapping windows of `seq_len` (tail dropped).
"""

import os
import time

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from sparse_llama import loading
from sparse_llama.data import sources
from sparse_llama.data.tokenizer import check_vocab, load_tokenizer
from sparse_llama.eval import perplexity
from sparse_llama.model import sharding, soft_prompt
from sparse_llama.model.config import check_context
from sparse_llama.quant import w8a8


def check_eval_config(config: ml_collections.ConfigDict) -> None:
    loading.check_model_section(config.model)
    loading.require_hf_path(config.model)
    if not config.data.eval_path:
        raise ValueError("data.eval_path is empty; pass --config.data.eval_path=PATH (a text "
                         "file, or .jsonl / .parquet documents)")
    if not os.path.exists(config.data.eval_path):
        raise FileNotFoundError(f"data.eval_path={config.data.eval_path!r} does not exist")
    if config.data.seq_len < 2:
        raise ValueError(f"data.seq_len must be at least 2, got {config.data.seq_len}")
    if config.eval.batch_size < 1:
        raise ValueError(f"eval.batch_size must be positive, got {config.eval.batch_size}")


def eval_tokens(path: str, tokenizer, *, text_field: str = "text") -> np.ndarray:
    """The token stream (int32, 1-D) that `path` is scored on; see the module docstring."""
    kind = sources.infer_kind(path)
    if kind == "text" and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return np.asarray(tokenizer.encode(f.read()), np.int32)
    docs = sources.read_documents(kind, path, text_field=text_field, text_split="file")
    pieces = []
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    for ids in tokenizer.encode_batch([docs[i] for i in range(len(docs))]):
        pieces.append(np.asarray([*bos, *ids, tokenizer.eos_id], np.int32))
    return np.concatenate(pieces)


def evaluate_tokens(bundle: loading.ModelBundle, tokenizer, token_ids, seq_len: int, *,
                    batch_size: int, mesh_cfg: ml_collections.ConfigDict, masks=None,
                    desc: str = "eval", prompt=None) -> perplexity.PerplexityResult:
    """Cut `token_ids` into windows, shard the model over the mesh, compute its perplexity
    (with a soft `prompt` before every window when given)."""
    check_context(seq_len, bundle.config)
    check_vocab(tokenizer, bundle.config.vocab_size)
    windows = perplexity.token_windows(token_ids, seq_len)
    mesh = sharding.make_mesh(mesh_cfg)
    rules = sharding.rules_from_config(mesh_cfg)
    params = sharding.shard(bundle.params, sharding.param_shardings(bundle.params, mesh, rules))
    if masks is not None:
        masks = sharding.shard(masks, sharding.param_shardings(masks, mesh, rules))
    data_width = sharding.batch_width(mesh, rules)
    batch_size = -(-batch_size // data_width) * data_width
    bar = tqdm(total=windows.shape[0], desc=desc, unit="win", disable=jax.process_index() != 0)

    def progress(done, _):
        bar.update(done - bar.n)

    try:
        # Params and batches carry explicit NamedShardings: no ambient mesh is needed.
        return perplexity.evaluate_windows(params, bundle.config, windows,
                                           batch_size=batch_size, masks=masks, mesh=mesh,
                                           rules=rules, progress=progress, prompt=prompt)
    finally:
        bar.close()  # before an error line, which must stay the last line on stderr


def evaluate_text(bundle: loading.ModelBundle, tokenizer, text: str, seq_len: int, *,
                  batch_size: int, mesh_cfg: ml_collections.ConfigDict, masks=None,
                  desc: str = "eval", prompt=None) -> perplexity.PerplexityResult:
    """Tokenize `text` once (no BOS) and compute the model's perplexity on its windows."""
    check_vocab(tokenizer, bundle.config.vocab_size)  # before tokenizing a long text
    return evaluate_tokens(bundle, tokenizer, tokenizer.encode(text), seq_len,
                           batch_size=batch_size, mesh_cfg=mesh_cfg, masks=masks, desc=desc,
                           prompt=prompt)


def run(config: ml_collections.ConfigDict) -> dict:
    check_eval_config(config)
    model = loading.model_config(config.model)
    check_context(config.data.seq_len, model)
    tokenizer = load_tokenizer(config.data.tokenizer_path or config.model.hf_path)
    check_vocab(tokenizer, model.vocab_size)  # before any weight is loaded
    prompt = soft_prompt.from_model_section(config.model, model)
    start = time.time()
    token_ids = eval_tokens(config.data.eval_path, tokenizer, text_field=config.data.text_field)
    bundle = loading.load_model(config.model)
    scoring = time.time()
    result = evaluate_tokens(bundle, tokenizer, token_ids, config.data.seq_len,
                             batch_size=config.eval.batch_size, mesh_cfg=config.mesh,
                             prompt=prompt)
    scoring = time.time() - scoring  # forward passes only (compile included), for tokens/s
    return {"perplexity": result.perplexity, "tokens": result.tokens, "windows": result.windows,
            "nll": result.nll, "seq_len": config.data.seq_len, "dtype": config.model.dtype,
            "packed": config.model.get("packed") or None,
            "quantized": "w8a8" if w8a8.is_quantized(bundle.params) else None,
            "soft_prompt": config.model.get("soft_prompt") or None,
            "tokens_per_s": round(result.tokens / max(scoring, 1e-9), 2),
            "seconds": round(time.time() - start, 3)}
