"""Small config blocks shared by the experiment files in configs/.

Each returns an `ml_collections.ConfigDict` for one section; an experiment file composes them in
`get_config(arg)` and changes what it needs. Validation happens where the section is used
(sparse_llama/*), before any work starts.
"""

import ml_collections


def model(preset: str = "tiny", hf_path: str | None = None) -> ml_collections.ConfigDict:
    """Which model: a preset from sparse_llama.model.config.PRESETS, or a Hugging Face dir."""
    return ml_collections.ConfigDict({
        "preset": preset,
        "hf_path": hf_path or "",  # non-empty: load config, weights and tokenizer from here
        "dtype": "float32",  # compute dtype: float32 | bfloat16 | float16
        "param_dtype": "float32",  # storage dtype of the params (master weights in training)
        "scan_layers": -1,  # -1: the preset's default; 0 / 1 to force the loop or lax.scan
        "remat": "",  # "": the preset's default; none | full | dots | dots_no_batch
        # "": xla (our softmax attention) | jax (jax.nn.dot_product_attention: cuDNN flash on
        # GPU where it applies, XLA elsewhere) | splash (JAX's Pallas splash kernels; TPU only,
        # sequences a multiple of 128)
        "attention": "",
    })


def mesh() -> ml_collections.ConfigDict:
    """Device mesh (data, fsdp, tensor). -1 on one axis takes the remaining devices."""
    return ml_collections.ConfigDict({
        "data": -1,
        "fsdp": 1,
        "tensor": 1,
        # logical axis -> mesh axis (or "" for replicated); see sparse_llama/model/sharding.py
        "rules": {
            "batch": "data,fsdp",
            "vocab": "tensor",
            "embed": "fsdp",
            "mlp": "tensor",
            "heads": "tensor",
            "kv_heads": "tensor",
            "layers": "",
            "norm": "",
        },
    })


def data(seq_len: int = 128) -> ml_collections.ConfigDict:
    """Training / evaluation data (sparse_llama/data/pipeline.py).

    What is read, in order of precedence: `path` (one source; its kind guessed from the file
    names: .jsonl/.json -> jsonl, .parquet -> parquet, else text), else `sources`, else the
    embedded corpus mixture {"text": default_prose 0.7, "code": default_code 0.3} (Python's own
    stdlib sources and docs, no download). A source is {"kind", "path", "weight", and
    optionally "text_field", "text_split"}; kind is text | jsonl | parquet | default_code |
    default_prose (the last two take no path). Weights are normalised and are fractions of
    training tokens. A text file is one token stream, a folder's files are documents, and
    JSONL / Parquet records are documents ([BOS] text EOS, no attention across them). Every
    source is tokenized once (cached in `token_cache`) and cut into non-overlapping `seq_len`
    windows, shuffled globally (a new permutation each epoch). Validation: `eval_path` if set,
    else a held-out fraction of each source's documents (by document id hash; the embedded
    corpus has its own fixed 3% split), or of a single text file the last fraction of its
    tokens.
    """
    return ml_collections.ConfigDict({
        "sources": {},  # name -> {"kind", "path", "weight", "text_field", "text_split"}
        "path": "",  # shortcut: one file or folder replaces the mixture
        "eval_path": "",  # held-out data (same kinds as path); default: the sources' split
        "seq_len": seq_len,
        "tokenizer_path": "",  # default: the model's tokenizer, else the embedded BPE
        "tokenizer_vocab_size": 0,  # embedded BPE size; 0: the model preset's vocab_size
        "text_field": "text",  # jsonl key / parquet column holding the document
        # text: auto / file (a file is one document: pretraining text is a stream) |
        # blank_lines (every blank-line separated block is its own BOS-framed document)
        "text_split": "auto",
        "validation_fraction": 0.03,  # documents (or a single file's tail) held out
        "add_bos": True,  # start every document (a text file: the file) with BOS, if any
        "shuffle": True,  # global window shuffle; False: windows in stream order
        "token_cache": "",  # tokenized sources; "": $SPARSE_LLAMA_CACHE/tokens
        "num_threads": 1,  # threads reading + tokenizing documents, once per source
        "prefetch_batches": 2,  # batches prepared in a background thread; 0: off
    })


def train(steps: int = 200, batch_size: int = 16) -> ml_collections.ConfigDict:
    """The training loop (sparse_llama/train/loop.py). Steps count optimizer updates."""
    return ml_collections.ConfigDict({
        "steps": steps,  # total optimizer updates (the schedule ends here)
        "objective": "lm",  # what the step minimises (sparse_llama/train/objectives.py)
        "batch_size": batch_size,  # global sequences per update, summed over processes
        "grad_accum": 1,  # micro-batches per update (batch_size must divide by it)
        "eval_every": 100,  # steps between evaluations (0: only at the end)
        "eval_batches": 8,  # validation batches of batch_size windows per evaluation
        "log_every": 10,  # steps between metric records
        "checkpoint_every": 100,  # steps between checkpoints (0: only at the end)
        "keep_checkpoints": 3,  # newest checkpoints kept in <workdir>/checkpoints
        "seed": 0,  # params init, data order and the step rng
        # Data shards of every global batch (0: one per process). Each process reads
        # data_shards / process_count of them, so a fixed value gives the same data order, and
        # the same result, on any number of processes.
        "data_shards": 0,
        "export_hf": True,  # write <workdir>/hf at the end
    })


def optimizer(lr: float = 3e-3) -> ml_collections.ConfigDict:
    """AdamW with linear warmup and cosine decay (sparse_llama/optim/factory.py)."""
    return ml_collections.ConfigDict({
        "lr": lr,  # peak learning rate
        "warmup_steps": 20,
        "min_lr_ratio": 0.1,  # final lr = lr * min_lr_ratio
        "weight_decay": 0.1,  # decoupled; not applied to norm scales
        "b1": 0.9,
        "b2": 0.95,
        "eps": 1e-8,
        "clip_norm": 1.0,  # global gradient norm; 0 disables clipping
    })


def sparsity(keep: bool = False) -> ml_collections.ConfigDict:
    """Which mask training keeps (sparse_llama/train/sparse_start.py, optim/keep_sparse.py)."""
    return ml_collections.ConfigDict({
        "keep": keep,  # True: pruned weights, their gradients and moments stay exactly 0
        "masks_path": "",  # "" = <model.hf_path>/masks if present, else the weights' zeros
        "init": "",  # "" | random | magnitude: a static mask chosen at the start (SPDF)
        "sparsity": 0.0,  # with init: the fraction pruned in every target matrix
        "release": False,  # a dense run that knowingly trains a sparse start's zeros (SPDF)
    })


def train_stage(tokens: float, *, lr: float, batch_size: int, warmup_steps: int,
                sparse: bool) -> ml_collections.ConfigDict:
    """A recipe's training stage (sparse_llama/recipes/stages.py): `tokens` of training on
    the recipe's data, with its own loop and optimizer settings."""
    stage = ml_collections.ConfigDict({
        "kind": "train",
        "tokens": tokens,  # token budget: steps = tokens / (batch_size * data.seq_len)
        "sparse": sparse,  # keep the previous stage's mask (sparsity.keep)
        "release": False,  # a dense stage that knowingly trains a sparse start's zeros
        "mask_init": "",  # "" | random | magnitude: a static mask at the start (SPDF)
        "mask_sparsity": 0.0,  # with mask_init: the fraction pruned in every matrix
        "data_path": "",  # this stage trains on this file or folder ("" = the recipe's data)
    })
    stage.train = train(steps=1, batch_size=batch_size)
    stage.train.eval_batches = 0  # stages are measured by the recipe (launch.eval protocol)
    stage.train.export_hf = True
    stage.optimizer = optimizer(lr=lr)
    stage.optimizer.warmup_steps = warmup_steps
    return stage


def soft_prompt_stage(tokens: float, *, lr: float, batch_size: int, warmup_steps: int,
                      num_tokens: int = 20) -> ml_collections.ConfigDict:
    """A recipe's soft-prompt stage (MediSwift): `tokens` of prompt tuning of the current,
    frozen model (configs/soft_prompt.py's objective) on `data_path` or the recipe's data."""
    from sparse_llama.train.adapters import soft_prompt_section

    stage = train_stage(tokens, lr=lr, batch_size=batch_size, warmup_steps=warmup_steps,
                        sparse=False)
    stage.kind = "soft_prompt"
    stage.optimizer.weight_decay = 0.0  # the prompt is not a weight to shrink
    stage.soft_prompt = soft_prompt_section(num_tokens=num_tokens)
    return stage


def prune_stage(sparsity: float, *, method: str = "sparsegpt", profile: str = "uniform",
                num_samples: int = 128, seq_len: int = 2048) -> ml_collections.ConfigDict:
    """A recipe's one-shot pruning stage: `pruning` and `calibration` keys as configs/prune.py;
    the calibration windows are drawn from the recipe's training mixture."""
    return ml_collections.ConfigDict({
        "kind": "prune",
        "pruning": {"method": method, "sparsity": sparsity, "profile": profile,
                    "keep_zeros": True},  # extending a mask keeps its old zeros
        "calibration": {"num_samples": num_samples, "seq_len": seq_len, "seed": 0,
                        "batch_size": 8},
    })


def recipe_eval(seq_len: int, max_chars: int = 0) -> ml_collections.ConfigDict:
    """How a recipe measures each stage: launch.eval's perplexity on the eval text."""
    return ml_collections.ConfigDict({
        "seq_len": seq_len,  # window length of the perplexity windows
        "batch_size": 8,
        "max_chars": max_chars,  # default data: cap on the held-out text (0: all of it)
    })


def single_run(variants: dict, variant: str | None, default: str, where: str
               ) -> ml_collections.ConfigDict:
    """One training run's config from a variant table of (preset, seq_len, steps, batch_size,
    lr, warmup_steps) rows: evaluation every steps/6, checkpoints every steps/3."""
    variant = variant or default
    if variant not in variants:
        raise ValueError(f"unknown variant {variant!r} of {where}; choose one of "
                         f"{sorted(variants)}")
    preset, seq_len, steps, batch, lr, warmup = variants[variant]
    config = ml_collections.ConfigDict()
    config.model = model(preset)
    config.mesh = mesh()
    config.data = data(seq_len=seq_len)
    config.train = train(steps=steps, batch_size=batch)
    config.train.eval_every = max(steps // 6, 1)
    config.train.checkpoint_every = max(steps // 3, 1)
    config.optimizer = optimizer(lr=lr)
    config.optimizer.warmup_steps = warmup
    return config
