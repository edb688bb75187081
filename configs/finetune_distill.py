"""Sparse fine-tuning with distillation from the dense teacher (arXiv 2405.03594, phase 3).

    python -m launch.train --config=configs/finetune_distill.py --config.model.hf_path=PRUNED \
        --config.distill.teacher_path=DENSE --config.data.path=TRAIN.jsonl --workdir=DIR

Everything of configs/finetune.py (same data, steps, optimizer, mask kept; the same variants
`tiny` and `m25`) plus the frozen teacher DENSE (a Hugging Face Llama with the student's
vocabulary and tokenizer, checked before loading; typically the dense model PRUNED was pruned
from, or that model fine-tuned on the task). The loss per loss token
(sparse_llama/distill/objective.py, docs/distill.md):

    ce_weight * CE + kd_weight * tau^2 KL(p_T^tau || p_S^tau) + layer_weight * SquareHead

defaults 1 / 1 / 1 and tau = 2; SquareHead is the per-block `sum ||h_T - h_S||^2 / sum
||h_T||^2` over the loss tokens of each micro-batch, averaged over the blocks. Keys:
`distill.teacher_path`, `distill.teacher_dtype` ("" = the student's compute dtype;
bfloat16 halves the teacher's memory), `distill.ce_weight`, `distill.kd_weight`,
`distill.layer_weight` (0 turns SquareHead off: logit KD only), `distill.temperature`.
`metrics.jsonl` has `ce`, `kd` and `squarehead` beside `loss`.

Measured (`:tiny`, a tiny dense model pruned to 70% by SparseGPT, 200 steps on 600k characters
of Python modules, held-out modules; docs/distill.md): held-out perplexity 11.79 against 12.56
for configs/finetune.py:tiny on the same data and budget (teacher 10.15, pruned 27.72); about
1.4x the plain step's time on a CPU. Cost per step: the student's
step plus one teacher forward (benchmarks/distill.py measures it). The last stdout line is
configs/finetune.py's; `eval_perplexity` is the student's on the held-out data.
"""

import ml_collections

from configs import blocks, finetune

VARIANTS = finetune.VARIANTS  # the same runs


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = finetune.get_config(arg)
    config.train.objective = "distill"
    config.distill = blocks.distill()
    return config
