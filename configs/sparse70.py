"""The 70% sparse foundational Llama recipe of arXiv 2405.03594, stage by stage.

    python -m launch.train --config=configs/sparse70.py --config.model.hf_path=LLAMA2_7B --workdir=DIR
    python -m launch.train --config=configs/sparse70.py:tiny --workdir=DIR      # CPU, minutes

Stages (each in DIR/<stage>/, resumable; docs/recipes.md): `dense` pretraining (only without
model.hf_path), `prune50` SparseGPT one-shot to 50% with calibration windows from the training
mixture, `sparse50` sparse pretraining with the mask kept, `prune70` SparseGPT from the
sparse-pretrained model extending its mask to 70% (old zeros kept), `sparse70` sparse
pretraining, `eval`, `export`. Per stage keys: `<stage>.tokens`, `<stage>.optimizer.lr`,
`<stage>.train.batch_size`, `<stage>.pruning.*`, `<stage>.calibration.num_samples` / `seq_len`;
`--config.prune50.pruning.profile=owl` for OWL layer sparsities.

Default (full size): Llama-2-7B from model.hf_path (required: the dense stage has no budget),
128 x 2048 calibration windows, 45B tokens of sparse pretraining at 50% and 100B more at 70%
(the paper's budgets), global batch 1024 x 2048 tokens (64 micro-batches), lr 1e-4 (our choice:
the paper gives no rate), fsdp over all devices. Data: `data.sources`, e.g. SlimPajama + The
Stack Python as in the paper. The paper reports, dense -> 50% -> 70%: MMLU 46.9 -> 41.3 -> 36.5,
HellaSwag 78.6 -> 76.5 -> 74.1 (docs/algorithms.md). Weeks on a pod.

`:tiny` (preset tiny, the embedded text + code corpus, 128-token windows): measured on a 2-core
CPU: dense 18.45, one-shot 50% 21.79, sparse50 19.14, one-shot 70% 29.99, sparse70 20.63
(perplexity on the held-out text; docs/recipes.md), about 4 minutes.
Last stdout line: {"stages": [{"name", "sparsity", "perplexity", "tokens", "seconds"}, ...],
"hf_dir", "workdir"}; DIR/loss.png and DIR/sparsity.png plot the run.
"""

import dataclasses

import ml_collections

from configs import blocks


@dataclasses.dataclass(frozen=True, kw_only=True)
class Recipe:
    """One size of the recipe: the paper's hyper-parameter table, one row."""

    preset: str
    seq_len: int  # tokens per training window
    batch: int  # global sequences per update, every train stage
    grad_accum: int  # micro-batches per update
    tokens_dense: float  # dense pretraining budget (0: start from model.hf_path)
    tokens50: float  # sparse pretraining at 50%
    tokens70: float  # sparse pretraining at the final sparsity
    lr_dense: float
    lr: float  # both sparse stages
    warmup_dense: int
    warmup: int  # both sparse stages
    calibration_samples: int  # SparseGPT calibration windows, each prune stage
    calibration_len: int  # their tokens
    fsdp: bool  # params sharded over all devices (mesh data 1, fsdp -1); False: data parallel
    checkpoint_every: int  # train stages' steps between checkpoints
    eval_max_chars: int  # the embedded corpus's held-out text measured (0: all of it)


VARIANTS = {
    "full": Recipe(preset="llama2_7b", seq_len=2048, batch=1024, grad_accum=64,
                   tokens_dense=0, tokens50=45e9, tokens70=100e9, lr_dense=3e-4, lr=1e-4,
                   warmup_dense=1000, warmup=1000, calibration_samples=128,
                   calibration_len=2048, fsdp=True, checkpoint_every=1000, eval_max_chars=0),
    "tiny": Recipe(preset="tiny", seq_len=128, batch=16, grad_accum=1,
                   tokens_dense=2_457_600, tokens50=409_600, tokens70=614_400, lr_dense=3e-3,
                   lr=1e-3, warmup_dense=30, warmup=20, calibration_samples=32,
                   calibration_len=128, fsdp=False, checkpoint_every=100,
                   eval_max_chars=200_000),
}


def build(variant: str, final_sparsity: float) -> ml_collections.ConfigDict:
    """The recipe up to `final_sparsity` (0.5: configs/sparse50.py, 0.7: this file)."""
    r = blocks.pick(VARIANTS, variant, "full", "configs/sparse70.py")
    config = ml_collections.ConfigDict()
    config.model = blocks.model(r.preset)
    config.mesh = blocks.mesh()
    if r.fsdp:
        config.mesh.data, config.mesh.fsdp = 1, -1
    config.data = blocks.data(seq_len=r.seq_len)
    config.eval = blocks.recipe_eval(r.seq_len, max_chars=r.eval_max_chars)
    config.dense = blocks.train_stage(r.tokens_dense, lr=r.lr_dense, batch_size=r.batch,
                                      warmup_steps=r.warmup_dense, sparse=False)
    config.prune50 = blocks.prune_stage(0.5, num_samples=r.calibration_samples,
                                        seq_len=r.calibration_len)
    config.sparse50 = blocks.train_stage(r.tokens50, lr=r.lr, batch_size=r.batch,
                                         warmup_steps=r.warmup, sparse=True)
    stages = ["dense", "prune50", "sparse50"]
    if final_sparsity > 0.5:
        config.prune70 = blocks.prune_stage(final_sparsity, num_samples=r.calibration_samples,
                                            seq_len=r.calibration_len)
        config.sparse70 = blocks.train_stage(r.tokens70, lr=r.lr, batch_size=r.batch,
                                             warmup_steps=r.warmup, sparse=True)
        stages += ["prune70", "sparse70"]
    for name in stages:
        if config[name].kind == "train":
            config[name].train.grad_accum = r.grad_accum
            config[name].train.checkpoint_every = r.checkpoint_every
    config.eval_final = ml_collections.ConfigDict({"kind": "eval"})
    config.export = ml_collections.ConfigDict({"kind": "export", "dtype": ""})
    config.stages = (*stages, "eval_final", "export")
    return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return build(arg or "full", 0.7)
