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

import ml_collections

from configs import blocks

# variant -> preset, seq_len, batch, grad_accum, dense tokens, sparse50 tokens, sparse70
# tokens, dense lr, sparse lr, warmup, calibration windows, calibration seq_len, mesh fsdp
_VARIANTS = {
    "full": ("llama2_7b", 2048, 1024, 64, 0, 45e9, 100e9, 3e-4, 1e-4, 1000, 128, 2048, -1),
    "tiny": ("tiny", 128, 16, 1, 2_457_600, 409_600, 614_400, 3e-3, 1e-3, 20, 32, 128, 1),
}


def build(variant: str, final_sparsity: float) -> ml_collections.ConfigDict:
    """The recipe up to `final_sparsity` (0.5: configs/sparse50.py, 0.7: this file)."""
    if variant not in _VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {sorted(_VARIANTS)}")
    (preset, seq_len, batch, accum, dense_tokens, tokens50, tokens70, dense_lr, lr, warmup,
     cal_n, cal_len, fsdp) = _VARIANTS[variant]
    config = ml_collections.ConfigDict()
    config.model = blocks.model(preset)
    config.mesh = blocks.mesh()
    if fsdp == -1:
        config.mesh.data, config.mesh.fsdp = 1, -1
    config.data = blocks.data(seq_len=seq_len)
    config.eval = blocks.recipe_eval(seq_len, max_chars=0 if variant == "full" else 200_000)
    config.dense = blocks.train_stage(dense_tokens, lr=dense_lr, batch_size=batch,
                                      warmup_steps=max(warmup, 30), sparse=False)
    config.prune50 = blocks.prune_stage(0.5, num_samples=cal_n, seq_len=cal_len)
    config.sparse50 = blocks.train_stage(tokens50, lr=lr, batch_size=batch, warmup_steps=warmup,
                                         sparse=True)
    stages = ["dense", "prune50", "sparse50"]
    if final_sparsity > 0.5:
        config.prune70 = blocks.prune_stage(final_sparsity, num_samples=cal_n, seq_len=cal_len)
        config.sparse70 = blocks.train_stage(tokens70, lr=lr, batch_size=batch,
                                             warmup_steps=warmup, sparse=True)
        stages += ["prune70", "sparse70"]
    for name in stages:
        if config[name].kind == "train":
            config[name].train.grad_accum = accum
            config[name].train.checkpoint_every = 1000 if variant == "full" else 100
    config.eval_final = ml_collections.ConfigDict({"kind": "eval"})
    config.export = ml_collections.ConfigDict({"kind": "export", "dtype": ""})
    config.stages = (*stages, "eval_final", "export")
    return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return build(arg or "full", 0.7)
