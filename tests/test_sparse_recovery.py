"""Sparse continued pretraining recovers at least as much as the textbook torch recipe.

A tiny model trained by the suite is pruned to 50% (magnitude, per matrix, written straight
into its safetensors: SparseGPT's per-layer compile costs minutes on a loaded 2-core CPU, and
the recovery, not the pruner, is under test here; benchmarks/sparse_recovery.py uses
SparseGPT at 50% and 70%), then trained further on the same text with the same optimizer
settings and token budget by `commands.train` with configs/sparse.py (masks from the zeros) and by
`torch_recovery` of benchmarks/sparse_recovery.py (transformers' Llama, masked gradients
before clipping and AdamW, weights re-zeroed after every step), once on its own random window
order and once on exactly ours' batches. All are measured on a
held-out text with `evaluate_text`, as `launch.eval` does.
"""

import glob
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import sparse_recovery as sr  # noqa: E402

from sparse_llama.data.tokenizer import load_tokenizer  # noqa: E402

TRAIN_CHARS, HELD_OUT_CHARS = 200_000, 40_000  # ~100k and ~20k tokens
DENSE_STEPS, RECOVERY_STEPS = 80, 40  # the recovery: 40 x 16 x 128 = 82k tokens
SPARSITY = 0.5
# ours_ppl <= torch_ppl * (1 + MARGIN). The two recipes are the same algorithm on the same
# windows (keep-sparse masks the gradients before clipping and AdamW and zeroes the pruned
# weights after the update, as the torch loop does); only the order of the windows differs
# (our seeded global shuffle vs a numpy permutation). Measured here (2-core CPU), held-out
# perplexity for data seeds 0 / 1 / 2: ours 97.53 / 97.19 / 98.26, torch 98.15 / 98.10 / 98.14
# (one-shot 109.74, dense 108.49): the worst pairing is ours 0.16% above torch, and the
# seed-to-seed range of ours is 1.1%. 2% is above that spread and below a real loss of recovery
# (a recipe that recovers only 80% of torch's 11.6 points would be 2.4% above it).
MARGIN = 0.02
SAME_ORDER_ATOL = 1e-4


def _magnitude_prune(dense_dir: str, out_dir: str, sparsity: float) -> None:
    """A copy of `dense_dir` whose q/k/v/o/gate/up/down weights have their smallest-|w|
    `sparsity` set to exactly 0 (per matrix); no masks/ folder, so training reads the zeros."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(dense_dir, out_dir)
    for file in glob.glob(os.path.join(out_dir, "*.safetensors")):
        tensors = load_file(file)
        for name in sr.target_tensors(out_dir):
            if name in tensors:
                w = tensors[name].copy()
                k = round(sparsity * w.size)
                w.reshape(-1)[np.argsort(np.abs(w), axis=None, kind="stable")[:k]] = 0
                tensors[name] = w
        save_file(tensors, file, metadata={"format": "pt"})


# Four trainings (dense, ours, torch twice) and two compiles of the train step: 88 s on a
# shared 2-core CPU at load average 10 (208-350 s beside the benchmark, at 12-16).
@pytest.mark.slow
def test_sparse_recovery_matches_the_torch_recipe(tmp_path):
    pytest.importorskip("transformers")
    train_text, held_out = sr.texts(TRAIN_CHARS, HELD_OUT_CHARS)
    train_path, eval_path = tmp_path / "train.txt", tmp_path / "held_out.txt"
    train_path.write_text(train_text)
    eval_path.write_text(held_out)
    dense_dir = sr.train_dense(str(train_path), str(tmp_path / "dense"), DENSE_STEPS)
    pruned = str(tmp_path / "pruned")
    _magnitude_prune(dense_dir, pruned, SPARSITY)
    tokenizer = load_tokenizer(pruned)
    pruned_zeros = sr.zero_fraction(pruned)
    assert pruned_zeros == pytest.approx(SPARSITY, abs=1e-3)

    r = sr.compare(pruned, str(train_path), str(eval_path), tokenizer,
                   sr.train_stream(train_text, tokenizer), str(tmp_path), steps=RECOVERY_STEPS,
                   torch_threads=1)
    dense_ppl = sr.perplexity(dense_dir, tokenizer, held_out)
    one_shot = sr.perplexity(pruned, tokenizer, held_out)
    print(f"held-out perplexity: dense {dense_ppl:.3f}, one-shot {one_shot:.3f}, "
          f"ours {r['ours_ppl']:.5f}, torch {r['torch_ppl']:.3f}, "
          f"torch on ours' batches {r['torch_same_order_ppl']:.5f}")
    assert r["torch_ppl"] < one_shot  # the setup is sound: the reference recovers
    assert r["ours_ppl"] < one_shot
    assert r["ours_ppl"] <= r["torch_ppl"] * (1 + MARGIN)
    # On exactly ours' batches the torch recipe lands on ours' weights: the two are the same
    # algorithm, and any gap above is the order of the windows. Measured: weights
    # 1.1e-6 apart (SAME_ORDER_ATOL leaves room for other CPUs' float32 sums), perplexity
    # equal to 7 digits.
    assert r["ours_ppl"] == pytest.approx(r["torch_same_order_ppl"], rel=1e-4)
    same = sr.target_tensors(r["torch_same_order_hf_dir"])
    ours = sr.target_tensors(r["ours_hf_dir"])
    print("max |ours - torch on ours' batches|:",
          max(float(np.max(np.abs(w - same[name]))) for name, w in ours.items()))
    for name, w in ours.items():
        np.testing.assert_allclose(w, same[name], rtol=0, atol=SAME_ORDER_ATOL, err_msg=name)

    # Ours' export keeps every pruned weight an exact zero, and no more than those.
    pruned_tensors = sr.target_tensors(pruned)
    assert sorted(ours) == sorted(pruned_tensors)
    for name, w in ours.items():
        np.testing.assert_array_equal(w == 0, pruned_tensors[name] == 0, err_msg=name)
    assert r["ours_sparsity"] == pruned_zeros
    assert r["torch_sparsity"] == pruned_zeros


def test_torch_windows_random_offsets_and_permuted_epochs():
    """The reference loop's data: "random" rows start at offsets other than multiples of
    seq_len and stay inside the stream; "permuted" covers every window once per epoch."""
    stream_len, seq_len, batch = 1000, 32, 4  # 31 windows of 33 tokens
    rows = sr.window_starts(stream_len, seq_len, batch, seed=3, windows="random")
    starts = np.concatenate([next(rows) for _ in range(200)])
    assert starts.min() >= 0 and starts.max() <= stream_len - seq_len - 1
    assert np.mean(starts % seq_len != 0) > 0.9  # not the fixed windows
    assert len(np.unique(starts)) > 300  # spread over the whole stream

    rows = sr.window_starts(stream_len, seq_len, batch, seed=3)
    starts = np.concatenate([next(rows) for _ in range(31)])  # 124 rows: 4 epochs of 31
    for epoch in np.split(starts, 4):
        np.testing.assert_array_equal(np.sort(epoch), np.arange(31) * seq_len)
    assert not np.array_equal(starts[:31], starts[31:62])  # a new permutation per epoch

    order = np.array([5, 0, 5, 30, 2, 2, 1, 7])
    given = list(sr.window_starts(stream_len, seq_len, batch, order=order))
    np.testing.assert_array_equal(np.concatenate(given), order * seq_len)
    with pytest.raises(ValueError, match="windows must be"):
        sr.window_starts(stream_len, seq_len, batch, windows="offsets")
