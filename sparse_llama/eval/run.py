"""`launch.eval`: perplexity of a model on a text file, from an ml-collections config."""

import os
import time

import jax
import ml_collections
from tqdm import tqdm

from sparse_llama.data.tokenizer import load_tokenizer
from sparse_llama.eval import perplexity
from sparse_llama.model import loading, sharding
from sparse_llama.model.config import check_context


def check_eval_config(config: ml_collections.ConfigDict) -> None:
    loading.check_model_section(config.model)
    loading.require_hf_path(config.model)
    if not config.data.eval_path:
        raise ValueError("data.eval_path is empty; pass --config.data.eval_path=FILE (a text "
                         "file to evaluate)")
    if not os.path.isfile(config.data.eval_path):
        raise FileNotFoundError(f"data.eval_path={config.data.eval_path!r} is not a file")
    if config.data.seq_len < 2:
        raise ValueError(f"data.seq_len must be at least 2, got {config.data.seq_len}")
    if config.eval.batch_size < 1:
        raise ValueError(f"eval.batch_size must be positive, got {config.eval.batch_size}")


def evaluate_text(bundle: loading.ModelBundle, tokenizer, text: str, seq_len: int, *,
                  batch_size: int, mesh_cfg: ml_collections.ConfigDict, masks=None,
                  desc: str = "eval") -> perplexity.PerplexityResult:
    """Tokenize `text` once, shard the model over the mesh and compute its perplexity."""
    check_context(seq_len, bundle.config)
    windows = perplexity.token_windows(tokenizer.encode(text), seq_len)
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

    with mesh:
        result = perplexity.evaluate_windows(params, bundle.config, windows,
                                             batch_size=batch_size, masks=masks, mesh=mesh,
                                             rules=rules, progress=progress)
    bar.close()
    return result


def run(config: ml_collections.ConfigDict) -> dict:
    check_eval_config(config)
    check_context(config.data.seq_len, loading.model_config(config.model))
    start = time.time()
    bundle = loading.load_model(config.model)
    tokenizer = load_tokenizer(config.data.tokenizer_path or config.model.hf_path)
    with open(config.data.eval_path, encoding="utf-8") as f:
        text = f.read()
    result = evaluate_text(bundle, tokenizer, text, config.data.seq_len,
                           batch_size=config.eval.batch_size, mesh_cfg=config.mesh)
    return {"perplexity": result.perplexity, "tokens": result.tokens, "windows": result.windows,
            "nll": result.nll, "seq_len": config.data.seq_len, "dtype": config.model.dtype,
            "seconds": round(time.time() - start, 3)}
