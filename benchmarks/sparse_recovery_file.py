"""Sparse recovery on ONE text file of your own: ours (data.path only) next to the torch loop.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/sparse_recovery_file.py FILE

The single-file case of benchmarks/sparse_recovery.py (whose functions it reuses). FILE is cut
into train (its first TRAIN_CHARS characters), held-out (the next HELD_OUT_CHARS) and the rest;
a byte-level BPE of 512 ids is trained on train + rest and a dense tiny Llama
(configs/dense.py:tiny, DENSE_STEPS steps of 8 x 256) on the same text, pruned to 70% with
SparseGPT (64 calibration windows). From the pruned model, for each seed:

  ours            configs/sparse.py:tiny with data.path = train (no eval_path: the last 3% of
                  its tokens are held out as validation and NOT trained on, as a user's run)
  ours_full       the same with data.eval_path = held-out (all of train is trained on)
  torch_random    `torch_recovery` on ALL of train's tokens, rows at random offsets
  torch_permuted  the same, non-overlapping windows permuted per epoch
  torch_head      torch_random on ours' training part only (train without its last 3%)

all with STEPS steps of BATCH x SEQ_LEN tokens at lr 5e-4 (warmup 20, cosine to 10%, AdamW
0.9 / 0.95, wd 0.1, clip 1.0). The budget is several epochs of train. Two perplexities per
model (`evaluate_text`, as `launch.eval`): `held_out` (text no run trained on) and `tail`
(train's last 3% of tokens: ours' validation split, which torch_random / torch_permuted /
ours_full train on). Rows: mean and std over SEEDS per variant. Minutes per run on a 2-core
CPU; docs/recipes.md ("configs/sparse.py") has a measured table. The last stdout line is
{"benchmark": "sparse_recovery_file", "rows": [...]}.
"""

import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import sparse_recovery as sr
from peak_report import emit

from configs import dense
from sparse_llama.commands import train as train_command
from sparse_llama.data.tokenizer import load_tokenizer, train_bpe

TRAIN_CHARS, HELD_OUT_CHARS = 450_000, 100_000
SEQ_LEN, BATCH, STEPS, LR = 256, 8, 300, 5e-4
DENSE_STEPS, SPARSITY, SEEDS = 400, 0.7, (0, 1, 2)
VALIDATION_FRACTION = 0.03  # configs/blocks.py data.validation_fraction
VARIANTS = ("ours", "ours_full", "torch_random", "torch_permuted", "torch_head")


def build(text: str, root: Path) -> dict:
    """Write train / held-out / dense texts, the tokenizer, the dense and the pruned model."""
    train = text[:TRAIN_CHARS]
    held = text[TRAIN_CHARS:TRAIN_CHARS + HELD_OUT_CHARS]
    paths = {name: root / f"{name}.txt" for name in ("train", "held_out", "dense")}
    paths["train"].write_text(train)
    paths["held_out"].write_text(held)
    paths["dense"].write_text(train + "\n\n" + text[TRAIN_CHARS + HELD_OUT_CHARS:])
    train_bpe([paths["dense"].read_text()], 512).save(root / "tokenizer")
    config = dense.get_config("tiny")
    config.data.update(path=str(paths["dense"]), eval_path=str(paths["held_out"]),
                       tokenizer_path=str(root / "tokenizer"), seq_len=SEQ_LEN)
    config.train.update(steps=DENSE_STEPS, batch_size=BATCH, eval_batches=0,
                        checkpoint_every=0, log_every=100)
    dense_dir = train_command.train(config, str(root / "dense"))["hf_dir"]
    sr.prune_model(dense_dir, str(root / "pruned"), SPARSITY, str(paths["dense"]),
                   num_samples=64, seq_len=SEQ_LEN)
    return {**{k: str(v) for k, v in paths.items()}, "dense": dense_dir,
            "pruned": str(root / "pruned")}


def recover(variant: str, seed: int, files: dict, stream: np.ndarray, head: np.ndarray,
            out: str) -> str:
    """One recovery of the pruned model; returns the trained Hugging Face directory."""
    config = sr.sparse_config(files["pruned"], files["train"], "", STEPS)
    config.data.seq_len = SEQ_LEN
    config.train.update(batch_size=BATCH, seed=seed)
    config.optimizer.update(lr=LR, warmup_steps=20)
    if variant.startswith("ours"):
        if variant == "ours_full":
            config.data.eval_path = files["held_out"]
        return train_command.train(config, out)["hf_dir"]
    windows = "permuted" if variant == "torch_permuted" else "random"
    sr.torch_recovery(files["pruned"], head if variant == "torch_head" else stream, out,
                      steps=STEPS, batch_size=BATCH, seq_len=SEQ_LEN,
                      optimizer={k: config.optimizer[k] for k in sr.OPTIMIZER_KEYS},
                      seed=seed, threads=sr.TORCH_THREADS, windows=windows)
    return out


def main(path: str) -> None:
    root = Path(tempfile.mkdtemp(prefix="sparse_recovery_file_"))
    files = build(Path(path).read_text(), root)
    tokenizer = load_tokenizer(files["pruned"])
    stream = sr.train_stream(Path(files["train"]).read_text(), tokenizer)
    # ours' training part of a single file (packing.tail_split of its pairs)
    head = stream[:len(stream) - round(VALIDATION_FRACTION * (len(stream) - 1))]
    texts = {"held_out": Path(files["held_out"]).read_text(),
             "tail": tokenizer.decode(stream[len(head):])}

    def measure(hf_dir):
        return {k: sr.perplexity(hf_dir, tokenizer, t, SEQ_LEN) for k, t in texts.items()}

    rows = [{"variant": name, **{f"{k}_ppl": round(v, 3) for k, v in measure(d).items()}}
            for name, d in (("dense", files["dense"]), ("one_shot", files["pruned"]))]
    for variant in VARIANTS:
        runs = []
        for seed in SEEDS:
            out = str(root / f"{variant}_{seed}")
            runs.append(measure(recover(variant, seed, files, stream, head, out)))
            shutil.rmtree(out, ignore_errors=True)
        row = {"variant": variant}
        for k in texts:
            values = [r[k] for r in runs]
            row.update({f"{k}_ppl": round(float(np.mean(values)), 3),
                        f"{k}_std": round(float(np.std(values)), 3)})
        rows.append(row)
        print(row, file=sys.stderr, flush=True)
    shutil.rmtree(root, ignore_errors=True)
    emit("sparse_recovery_file", rows, ["variant", "held_out_ppl", "tail_ppl"],
         train_tokens=int(stream.size), epochs=round(STEPS * BATCH * SEQ_LEN / head.size, 2),
         seeds=list(SEEDS), load_average=round(os.getloadavg()[0], 1))


if __name__ == "__main__":
    main(sys.argv[1])
