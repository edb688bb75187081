"""Small config blocks shared by the experiment files in configs/.

Each returns an `ml_collections.ConfigDict` for one section; an experiment file composes them in
`get_config(arg)` and changes what it needs. Every section's defaults live here and only here
(each builder's docstring names where sparse_llama/ reads the section); a builder's `**changes`
may only name keys the section has. Validation happens where the section is used
(sparse_llama/*), before any work starts.

A variant table is a dict of name -> row, a row a frozen dataclass given by field names only
(`Run` below is the one `single_run` takes): an unknown or missing field name is a TypeError
naming it when the table is built, so a swapped or forgotten value cannot pass silently.
"""

import dataclasses

import ml_collections


def pick(table: dict, variant: str | None, default: str, where: str):
    """`table[variant or default]`; a ValueError naming `where` and the choices otherwise."""
    variant = variant or default
    if variant not in table:
        raise ValueError(f"unknown variant {variant!r} of {where}; choose one of "
                         f"{sorted(table)}")
    return table[variant]


def _section(name: str, defaults: dict, changes: dict) -> ml_collections.ConfigDict:
    """The `name` section: `defaults` (in their order) updated by `changes`, whose keys must
    be among the defaults'."""
    unknown = sorted(set(changes) - set(defaults))
    if unknown:
        raise ValueError(f"the {name} section has no key {', '.join(map(repr, unknown))}; its "
                         f"keys are {list(defaults)}")
    section = ml_collections.ConfigDict(defaults)
    section.update(changes)
    return section


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
        "objective": "lm",  # what the step minimises (sparse_llama/train/objective.py)
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
    """A recipe's training stage (sparse_llama/commands/recipe.py): `tokens` of training on
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
    stage = train_stage(tokens, lr=lr, batch_size=batch_size, warmup_steps=warmup_steps,
                        sparse=False)
    stage.kind = "soft_prompt"
    stage.optimizer.weight_decay = 0.0  # the prompt is not a weight to shrink
    stage.soft_prompt = soft_prompt(num_tokens=num_tokens)
    return stage


def prune_stage(sparsity: float, *, method: str = "sparsegpt", profile: str = "uniform",
                num_samples: int = 128, seq_len: int = 2048) -> ml_collections.ConfigDict:
    """A recipe's one-shot pruning stage (sparse_llama/commands/recipe.py): complete `pruning`
    and `calibration` sections as configs/prune.py's; the calibration windows are drawn from
    the recipe's training mixture (its `calibration.path` is set by the recipe)."""
    return ml_collections.ConfigDict({
        "kind": "prune",
        # keep_zeros: extending a mask keeps the old one pruned
        "pruning": pruning(method=method, sparsity=sparsity, profile=profile, keep_zeros=True),
        "calibration": calibration(num_samples=num_samples, seq_len=seq_len, seed=0,
                                   batch_size=8),
    })


def recipe_eval(seq_len: int, max_chars: int = 0) -> ml_collections.ConfigDict:
    """How a recipe measures each stage: launch.eval's perplexity on the eval text."""
    return ml_collections.ConfigDict({
        "seq_len": seq_len,  # window length of the perplexity windows
        "batch_size": 8,
        "max_chars": max_chars,  # default data: cap on the held-out text (0: all of it)
    })


@dataclasses.dataclass(frozen=True, kw_only=True)
class Run:
    """One training run of a variant table (`single_run`)."""

    preset: str  # sparse_llama.model.config.PRESETS
    seq_len: int  # tokens per window
    steps: int  # optimizer updates
    batch_size: int  # global sequences per update
    lr: float  # peak learning rate
    warmup_steps: int


def single_run(variants: dict[str, Run], variant: str | None, default: str, where: str
               ) -> ml_collections.ConfigDict:
    """One training run's config from a variant table of `Run` rows: evaluation every
    steps/6, checkpoints every steps/3."""
    run = pick(variants, variant, default, where)
    config = ml_collections.ConfigDict()
    config.model = model(run.preset)
    config.mesh = mesh()
    config.data = data(seq_len=run.seq_len)
    config.train = train(steps=run.steps, batch_size=run.batch_size)
    config.train.eval_every = max(run.steps // 6, 1)
    config.train.checkpoint_every = max(run.steps // 3, 1)
    config.optimizer = optimizer(lr=run.lr)
    config.optimizer.warmup_steps = run.warmup_steps
    return config


def pruning(**changes) -> ml_collections.ConfigDict:
    """One-shot pruning (sparse_llama/commands/prune.py: check_prune_config, the driver's
    method, N:M pattern and layer profile); configs/prune.py and every recipe prune stage."""
    return _section("pruning", {
        "method": "sparsegpt",  # sparsegpt | wanda | magnitude
        "sparsity": 0.5,  # average fraction of pruned weights in the targeted linears
        "n": 0,  # N:M pattern (n pruned in every m consecutive inputs); 0:0 = unstructured
        "m": 0,
        "profile": "uniform",  # uniform | owl | list
        "owl_m": 5.0,  # OWL outlier threshold M (docs/algorithms.md, "OWL")
        "owl_lambda": 0.08,  # OWL: layer sparsities span 2 lambda around their mean S
        "layer_sparsities": (),  # profile=list: one value per decoder block
        "module_sparsity": {},  # overrides by module, e.g. {"down_proj": 0.5}
        "block_size": 128,  # SparseGPT column block
        "dampening": 0.01,  # SparseGPT: lambda = dampening * mean(diag(H))
        "true_sequential": False,  # {q,k,v} -> {o} -> {gate,up} -> {down}, inputs recomputed
        # the old mask stays pruned (extend 50% -> 70%): <hf_path>/masks when present, else
        # the weights already exactly zero (sparse_llama/sparse_io/starting_masks.py)
        "keep_zeros": True,
    }, changes)


def calibration(**changes) -> ml_collections.ConfigDict:
    """Calibration windows (sparse_llama/commands/prune.py: check_calibration_and_outputs and
    the windows it reads; launch.quantize's too, and the recipe prune stages')."""
    return _section("calibration", {
        "path": "",  # text file or .npy token ids; "" = embedded corpus
        "num_samples": 128,
        "seq_len": 2048,
        "seed": 0,
        "batch_size": 8,  # windows per forward micro-batch
        # A text shorter than num_samples x seq_len tokens is refused (its windows would
        # overlap heavily); True accepts it knowingly.
        "allow_overlap": False,
    }, changes)


def perplexity_eval(**changes) -> ml_collections.ConfigDict:
    """The `eval` section of launch.prune and launch.quantize: perplexity on `path` before and
    after (sparse_llama/commands/prune.py; "" = none)."""
    return _section("eval", {"path": "", "seq_len": 2048, "batch_size": 8}, changes)


def quant(**changes) -> ml_collections.ConfigDict:
    """The `quant` section (sparse_llama/commands/quantize.py reads it into
    sparse_llama/quant/calibrate.py's QuantSpec)."""
    return _section("quant", {
        "method": "gptq",  # gptq | rtn
        "bits": 8,  # 8 | 4
        "group_size": 0,  # 0: one scale per output channel; else inputs per scale
        "act_order": False,  # GPTQ: columns by decreasing diag(H)
        "smoothquant_alpha": 0.5,  # 0 = off; in [0, 1]
        "activations": "int8_dynamic",  # none | int8_dynamic (W8A8: bits 8, group_size 0)
        "block_size": 128,  # GPTQ lazy-update block
        "dampening": 0.01,  # GPTQ: lambda = dampening * mean(diag(H))
    }, changes)


def finetune(**changes) -> ml_collections.ConfigDict:
    """The `finetune` section, LoRA (sparse_llama/adapters/objective.py: lora_settings)."""
    return _section("finetune", {
        "lora_rank": 0,  # R > 0: train rank-R adapters of every target linear, model frozen
        "lora_alpha": 0.0,  # scale alpha / R; 0 = R
    }, changes)


def soft_prompt(**changes) -> ml_collections.ConfigDict:
    """The `soft_prompt` section (sparse_llama/adapters/objective.py: the soft_prompt
    objective and check_soft_prompt_config)."""
    return _section("soft_prompt", {
        "num_tokens": 20,  # virtual tokens in front of every input
        "init_text": "",  # their initial embeddings; "" = random vocabulary rows
    }, changes)


def distill(**changes) -> ml_collections.ConfigDict:
    """The `distill` section (sparse_llama/distill/objective.py: check_distill_config)."""
    return _section("distill", {
        "teacher_path": "",  # the dense teacher, a Hugging Face Llama directory
        "teacher_dtype": "",  # "" = the student's compute dtype
        "ce_weight": 1.0,  # loss = ce_weight CE + kd_weight tau^2 KL + layer_weight SquareHead
        "kd_weight": 1.0,
        "layer_weight": 1.0,  # 0: logit KD only
        "temperature": 2.0,  # tau
    }, changes)


def sat(mlp_rate: float = 0.5, head_rate: float = 0.0) -> ml_collections.ConfigDict:
    """SAT's keys (sparse_llama/sat/objective.py: make_plan validates them before the run
    starts)."""
    return ml_collections.ConfigDict({
        "metric": "maxip",  # uniform | magnitude | wanda | maxip (sparse_llama/sat/scores.py)
        "selection": "sampling",  # sampling (Gumbel-top-k of softmax(score / T)) | topk
        "temperature": 0.05,  # sampling temperature over the normalised scores
        "normalize": "max",  # max | sum | zscore: per-layer score normalisation (sampling)
        "mlp_rate": mlp_rate,  # fraction of MLP channels omitted per step, in [0, 1)
        "head_rate": head_rate,  # fraction of KV groups omitted (a multiple of 1/num_kv_heads)
        "layers": "all",  # blocks SAT applies to: all | "0,2" | "2-5"
        "freeze_omitted": True,  # omitted units: no update, no moment / weight-decay change
        "score_fraction": 0.125,  # share of the batch's rows the scores are computed from
        "score_len": 0,  # score only each row's first score_len positions (0: whole rows)
        "lors": {
            "constant_fraction": 0.8,  # share of train.steps at the full rates
            "rungs": 4,  # equal rungs over the rest; the last rung is dense
        },
    })
