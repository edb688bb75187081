"""Which mask a training run keeps (train/sparse_start.py) through `commands.train`: a pruned
Hugging Face directory's `masks/` (or its zeros), refusals before any checkpoint, the dense-run
warning, static `sparsity.init` masks from scratch, and exact resume of a sparse run."""

import json
import logging
import os
import re
from pathlib import Path

import hf_fixtures
import jax
import numpy as np
import pytest
from test_train_loop import StopAt, final_state

from configs import sparse
from sparse_llama.commands import export as export_command
from sparse_llama.commands import train as train_command
from sparse_llama.ground.tree_paths import path_name
from sparse_llama.model import hf_io, llama
from sparse_llama.model.config import preset
from sparse_llama.optim.keep_sparse import find_masks
from sparse_llama.sparse_io import mask_io
from sparse_llama.sparsity.masks import is_target
from sparse_llama.train import sparse_start
from sparse_llama.train import state as state_lib

HF_CFG = preset("tiny").replace(vocab_size=hf_fixtures.TINY["vocab_size"],
                                max_position_embeddings=64)
EXTRA = ("layers", "mlp", "up_proj", (1, 3, 5))  # an exact zero that masks/ keeps
TARGETS = [("self_attn", n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")] + [
    ("mlp", n) for n in ("gate_proj", "up_proj", "down_proj")]


def target_leaves(tree) -> dict:
    return {path_name(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
            if is_target(path_name(p))}


def extra(tree):
    return tree["layers"]["mlp"]["up_proj"][EXTRA[3]]


def half_masks(params, seed=0) -> dict:
    """~50% random keep-masks on the target tensors, 0-d True elsewhere."""
    rng = np.random.default_rng(seed)

    def make(path, w):
        if not is_target(path_name(path)):
            return np.ones((), bool)
        return rng.random(w.shape) >= 0.5
    return jax.tree_util.tree_map_with_path(make, params)


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """Pruned tiny HF directories and a text file to train on.

    with_masks: weights zero where `masks` prune, plus one more exact zero (EXTRA) that the
      masks keep; masks/ beside them. zeros_only: the same weights without masks/.
    """
    root = tmp_path_factory.mktemp("sparse_start")
    tok = hf_fixtures.save_tokenizer(root / "tok")
    params = jax.device_get(llama.init_params(jax.random.key(0), HF_CFG))
    masks = half_masks(params)
    masks["layers"]["mlp"]["up_proj"][EXTRA[3]] = True
    pruned = jax.tree.map(lambda w, m: np.where(m, w, 0).astype(w.dtype), params, masks)
    pruned["layers"]["mlp"]["up_proj"][EXTRA[3]] = 0.0
    with_masks = hf_io.save_hf(pruned, HF_CFG, root / "with_masks", tokenizer_dir=tok)
    mask_io.save_masks(masks, with_masks / "masks")
    zeros_only = hf_io.save_hf(pruned, HF_CFG, root / "zeros_only", tokenizer_dir=tok)
    text = root / "text.txt"
    text.write_text(" ".join(hf_fixtures.SENTENCES * 150))
    return {"root": root, "tok": tok, "params": params, "masks": masks, "pruned": pruned,
            "with_masks": with_masks, "zeros_only": zeros_only, "text": text}


def run_config(start, hf_path="", steps=4, **sparsity):
    config = sparse.get_config("tiny")
    config.model.hf_path = str(hf_path)
    config.data.path = str(start["text"])
    config.data.seq_len = 32
    config.train.update(steps=steps, batch_size=8, log_every=1, eval_every=0, eval_batches=0,
                        checkpoint_every=2, keep_checkpoints=5)
    config.optimizer.warmup_steps = 1
    config.sparsity.update(sparsity)
    return config


def no_checkpoint_written(workdir) -> bool:
    ckpt = workdir / "checkpoints"
    return (not ckpt.exists() or not any(ckpt.iterdir())) and not (workdir / "hf").exists()


@pytest.fixture(scope="module")
def from_masks_dir(start, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("from_masks")
    summary = train_command.train(run_config(start, start["with_masks"]), str(workdir))
    return workdir, summary


def test_export_keeps_the_masks_of_masks_dir_with_exact_zeros(start, from_masks_dir):
    workdir, summary = from_masks_dir
    hf = workdir / "hf"
    assert summary["hf_dir"] == str(hf) and summary["step"] == 4
    assert (hf / "masks").is_dir() and (hf / "sparsity_report.json").is_file()
    _, out = hf_io.load_hf(hf)
    saved = mask_io.load_masks(hf / "masks", out)
    for name, m in target_leaves(start["masks"]).items():
        w, w0 = target_leaves(out)[name], target_leaves(start["pruned"])[name]
        # Catches: a dense optimizer (pruned weights revived), masks lost on export.
        assert np.all(w[~m] == 0), name
        np.testing.assert_array_equal(target_leaves(saved)[name], m)
        assert np.count_nonzero(w[m] != w0[m]) > 0.9 * m.sum(), name  # it did train
    # masks/ won over the zeros: the weight that was an exact zero but is kept by masks/ has
    # trained away from 0 (masks from the zeros would have pinned it at exactly 0).
    assert extra(out) != 0.0
    assert summary["sparsity"] == pytest.approx(
        1 - np.mean(np.concatenate([m.ravel() for m in target_leaves(start["masks"]).values()])),
        abs=1e-9)
    report = json.loads((hf / "sparsity_report.json").read_text())
    assert report["overall"] == pytest.approx(summary["sparsity"], abs=1e-9)
    # `launch.export` of the last checkpoint reads the params and the optimizer's masks
    # alone and writes the same directory (masks/ included: not masks from the zeros, which
    # would prune the kept exact zero).
    again = Path(export_command.export_workdir(str(workdir), str(workdir / "hf_again"))["hf_dir"])
    _, out_again = hf_io.load_hf(again)
    jax.tree.map(np.testing.assert_array_equal, out_again, out)
    jax.tree.map(np.testing.assert_array_equal, mask_io.load_masks(again / "masks", out), saved)


def test_masks_come_from_the_zeros_without_masks_dir(start, caplog):
    # The choice loaded_masks makes for the loop (the masks/ case trains above).
    for hf_path, want_extra, source in ((start["with_masks"], True, "masks"),
                                        (start["zeros_only"], False, "exact zeros")):
        config = run_config(start, hf_path, keep=True)
        _, params = hf_io.load_hf(hf_path)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            masks = sparse_start.loaded_masks(config, jax.device_get(params))
        assert bool(extra(masks)) is want_extra
        zeros = {n: w != 0 for n, w in target_leaves(start["pruned"]).items()}
        for name, m in target_leaves(masks).items():
            differs = np.count_nonzero(m != zeros[name])
            assert differs == (1 if (want_extra and name == "layers/mlp/up_proj") else 0), name
        assert source in caplog.text  # the log says which


def _bad_dir(start, name, masks=None, params=None):
    out = hf_io.save_hf(start["pruned"] if params is None else params, HF_CFG,
                        start["root"] / name, tokenizer_dir=start["tok"])
    if masks is not None:
        mask_io.save_masks(masks, out / "masks")
    return out


def _wrong_shape(start):
    masks = jax.tree.map(np.copy, start["masks"])
    masks["layers"]["mlp"]["up_proj"] = np.swapaxes(masks["layers"]["mlp"]["up_proj"], 1, 2)
    return {"hf_path": _bad_dir(start, "bad_shape", masks=masks)}, {"keep": True}


def _wrong_tree(start):
    masks = jax.tree.map(np.copy, start["masks"])
    del masks["norm"]
    return {"hf_path": _bad_dir(start, "bad_tree", masks=masks)}, {"keep": True}


def _nonzero(start):
    # Dense weights (nonzero everywhere) beside masks that prune half of them.
    return ({"hf_path": _bad_dir(start, "bad_nonzero", masks=start["masks"],
                                 params=start["params"])}, {"keep": True})


@pytest.mark.parametrize("case, message", [
    (_wrong_shape, r"mask layers/mlp/up_proj has shape \(2, 176, 64\) but the weight has "
                   r"shape \(2, 64, 176\)"),
    (_wrong_tree, r"mask tree does not match the params tree: missing \['norm'\]"),
    (_nonzero, r"nonzero weights where the masks from .*bad_nonzero/masks prune: layers/mlp/down_proj \(\d+ nonzero\)"),
    (lambda s: ({}, {"keep": False, "init": "random", "sparsity": 0.5}),
     r"sparsity.init='random' chooses a mask that only sparsity.keep=True keeps"),
    (lambda s: ({}, {"keep": True}), r"sparsity.keep=True needs a sparse start"),
], ids=["mask_shape", "mask_tree", "nonzero_at_pruned", "init_without_keep",
        "keep_without_start"])
def test_refusals_before_any_checkpoint(start, tmp_path, case, message):
    where, sparsity = case(start)
    config = run_config(start, where.get("hf_path", ""), **sparsity)
    with pytest.raises(ValueError, match=message):
        train_command.train(config, str(tmp_path / "run"))
    assert no_checkpoint_written(tmp_path / "run")


def _densify_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.WARNING and "train them back to nonzero" in r.getMessage()]


@pytest.mark.parametrize("release", [False, True])
def test_dense_run_from_a_sparse_checkpoint_warns_unless_released(start, tmp_path, caplog,
                                                                  monkeypatch, release):
    class Started(Exception):
        pass

    def stop_here(*args, **kwargs):
        raise Started  # the loop got past the mask decision: no need to compile a step

    monkeypatch.setattr(state_lib, "state_from_params", stop_here)
    config = run_config(start, start["with_masks"], keep=False, release=release)
    with caplog.at_level(logging.WARNING), pytest.raises(Started):
        train_command.train(config, str(tmp_path))
    found = _densify_warnings(caplog)
    if release:
        assert found == []  # sparsity.release=True: densifying is the plan
    else:
        # Catches: no warning, or one that does not say how sparse or what to use instead.
        assert len(found) == 1
        assert "50." in found[0] or "49." in found[0]
        assert "configs/sparse.py" in found[0] and "sparsity.release=True" in found[0]


def test_dense_warning_threshold_is_ten_percent(start, caplog):
    params = jax.tree.map(np.copy, start["params"])
    rng = np.random.default_rng(1)
    config = run_config(start, start["zeros_only"], keep=False)
    for fraction, warns in ((0.09, False), (0.11, True)):
        def zero_some(path, w, fraction=fraction):
            if not is_target(path_name(path)):
                return w
            return np.where(rng.random(w.shape) < fraction, 0, w).astype(w.dtype)

        p = jax.tree_util.tree_map_with_path(zero_some, params)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert sparse_start.loaded_masks(config, p) is None
        assert bool(_densify_warnings(caplog)) is warns, fraction


def per_matrix_zeros(tree) -> dict:
    return {(name, i): int(np.count_nonzero(w[i] == 0))
            for name, w in target_leaves(tree).items() for i in range(w.shape[0])}


def initial_params(model_cfg, seed):
    """The params a from-scratch run starts with (state.py: init key fold_in(seed key, 0))."""
    key = jax.random.fold_in(jax.random.PRNGKey(seed), 0)
    return jax.device_get(llama.init_params(key, model_cfg))


def magnitude_runs(start, tmp_path):
    """A 4-step magnitude-masked run from scratch, and the same stopped at 2 and resumed."""
    config = run_config(start, init="magnitude", sparsity=0.3, keep=True)
    straight = tmp_path / "magnitude"
    summary = train_command.train(config, str(straight))
    split = tmp_path / "magnitude_split"
    first = train_command.train(config, str(split), stop=StopAt(2))
    second = train_command.train(config, str(split))
    return config, straight, summary, split, first, second


def test_magnitude_init_from_scratch_and_an_exact_resume(start, tmp_path):
    # One test for the three runs (a module fixture would run them once per xdist worker).
    config, straight, summary, split, first, second = magnitude_runs(start, tmp_path)
    model, out = hf_io.load_hf(straight / "hf")
    masks = target_leaves(mask_io.load_masks(straight / "hf" / "masks", out))
    init = target_leaves(initial_params(model, config.train.seed))
    for name, w0 in init.items():
        for i in range(w0.shape[0]):
            n = w0[i].size
            k = int(np.floor(0.3 * n + 0.5))
            # Independent: the k entries of smallest |w| of the initial matrix (no ties among
            # random float32 weights). Catches: magnitude scored on the trained weights, one
            # threshold across the stacked layers instead of per matrix, random scores.
            smallest = np.zeros(n, bool)
            smallest[np.argsort(np.abs(w0[i]).ravel(), kind="stable")[:k]] = True
            np.testing.assert_array_equal(~masks[name][i].ravel(), smallest, err_msg=name)
    # Exactly 30% (rounded) of every matrix of every layer is zero after training.
    for (name, i), zeros in per_matrix_zeros(out).items():
        assert zeros == int(np.floor(0.3 * init[name][i].size + 0.5)), (name, i)
    assert summary["sparsity"] == pytest.approx(0.3, abs=1e-3)

    # -- resumed: stopped after step 2 (checkpoint), rerun to step 4 --
    assert first["stopped"] and first["step"] == 2 and second["step"] == 4
    step_a, state_a, data_a = final_state(straight, config)
    step_b, state_b, data_b = final_state(split, config)
    assert step_a == step_b == 4
    # Bit for bit, masks in the optimizer state included. Catches: the static mask recomputed
    # on the restored (trained) weights, masks not restored, data order restarted.
    jax.tree.map(np.testing.assert_array_equal, state_a, state_b)
    assert data_a == data_b
    masks = find_masks(state_b.opt_state)
    for name, m in target_leaves(masks).items():
        assert np.all(target_leaves(state_b.params)[name][~m] == 0), name
    _, out_a = hf_io.load_hf(straight / "hf")
    _, out_b = hf_io.load_hf(split / "hf")
    jax.tree.map(np.testing.assert_array_equal, out_a, out_b)
    assert os.path.isdir(split / "hf" / "masks")


def test_random_init_is_exact_per_matrix_and_not_magnitude(start, tmp_path):
    config = run_config(start, steps=2, init="random", sparsity=0.3, keep=True)
    summary = train_command.train(config, str(tmp_path))
    model, out = hf_io.load_hf(tmp_path / "hf")
    masks = target_leaves(mask_io.load_masks(tmp_path / "hf" / "masks", out))
    init = target_leaves(initial_params(model, config.train.seed))
    weights = target_leaves(out)
    for (name, i), zeros in per_matrix_zeros(out).items():
        # Catches: a per-leaf (not per-matrix) count, or a mask missing from the export.
        assert zeros == int(np.floor(0.3 * init[name][i].size + 0.5)), (name, i)
        np.testing.assert_array_equal(weights[name][i] == 0, ~masks[name][i], err_msg=name)
    up = masks["layers/mlp/up_proj"]
    assert not np.array_equal(up[0], up[1])  # each layer its own draw
    # Not the magnitude mask: random scores prune large and small weights alike.
    w0 = np.abs(init["layers/mlp/up_proj"][0])
    assert np.median(w0[~up[0]]) > 0.5 * np.median(w0)
    assert summary["sparsity"] == pytest.approx(0.3, abs=1e-3)


# --- a sparse start must be sparse; a static mask must not silently replace one ---------------

def _dir(start, name, params, masks=None, **save):
    out = start["root"] / name
    if not out.exists():
        out = hf_io.save_hf(params, HF_CFG, out, tokenizer_dir=start["tok"], **save)
        if masks is not None:
            mask_io.save_masks(masks, out / "masks")
    return out


def _zero_fraction(params, fraction, seed=1):
    """`params` with about `fraction` of every target tensor set to exactly 0."""
    rng = np.random.default_rng(seed)

    def zero_some(path, w):
        if not is_target(path_name(path)):
            return w
        return np.where(rng.random(w.shape) < fraction, 0, w).astype(w.dtype)
    return jax.tree_util.tree_map_with_path(zero_some, params)


def _dense_with_all_true_masks(start):
    # What a sparse run from a dense checkpoint exported before this check: masks/ all True.
    masks = jax.tree.map(lambda m: np.ones(np.shape(m), bool), start["masks"])
    return _dir(start, "dense_true_masks", start["params"], masks)


@pytest.mark.parametrize("which", ["dense", "dense_with_all_true_masks"])
def test_a_sparse_run_from_a_dense_checkpoint_is_refused_before_any_checkpoint(
        start, tmp_path, which):
    hf = (_dir(start, "dense", start["params"]) if which == "dense"
          else _dense_with_all_true_masks(start))
    # Catches: a dense checkpoint given to configs/sparse.py training dense (all-True masks
    # from its zeros, or from an all-True masks/) and exporting "sparsity": 0.0.
    with pytest.raises(ValueError, match=(
            rf"sparse training from {re.escape(str(hf))} .*only 0\.0% of its target weights are pruned.*"
            r"launch\.prune.*sparsity\.keep=False")):
        train_command.train(run_config(start, hf), str(tmp_path / "run"))
    assert no_checkpoint_written(tmp_path / "run")


def test_the_sparse_start_threshold_refuses_below_ten_percent_and_passes_real_prunes(start):
    # Catches: a threshold so high that a light prune (a 2:8 = 25% mask) is refused, or so
    # low that a nearly dense checkpoint passes.
    assert 0.0 < sparse_start.SPARSE_CHECKPOINT_MIN <= 0.25
    config = run_config(start, start["zeros_only"], keep=True)
    for fraction, refused in ((0.05, True), (0.09, True), (0.12, False), (0.25, False)):
        p = _zero_fraction(start["params"], fraction)
        if refused:
            with pytest.raises(ValueError, match="target weights are pruned"):
                sparse_start.loaded_masks(config, p)
        else:
            masks = sparse_start.loaded_masks(config, p)
            assert sparse_start.mask_sparsity(masks) == pytest.approx(fraction, abs=0.01)


def _fraction_false(masks) -> float:
    leaves = [m for m in target_leaves(masks).values()]
    return 1 - sum(int(m.sum()) for m in leaves) / sum(m.size for m in leaves)


def test_checkpoint_sparsity_reads_the_masks_file_or_the_zeros_tensor_by_tensor(start,
                                                                                  monkeypatch):
    zeros = np.mean(np.concatenate([w.ravel() == 0 for w in
                                    target_leaves(start["pruned"]).values()]))
    pruned = _fraction_false(start["masks"])
    assert zeros != pruned  # EXTRA: a zero that masks/ keeps tells the two sources apart
    # Never the whole model, never a device: tensors read one at a time with numpy.
    for name in ("load_hf", "_to_device"):
        monkeypatch.setattr(hf_io, name, lambda *a, **k: pytest.fail("loaded the model"))
    monkeypatch.setattr(mask_io, "load_masks", lambda *a, **k: pytest.fail("loaded masks"))
    # Catches: masks/ ignored (the zeros counted instead), a wrong popcount of the packed bits
    # (padding bits of a last axis that is not a multiple of 8, or the bit order), a count
    # over untargeted tensors (embeddings, norms).
    assert sparse_start.checkpoint_sparsity(start["with_masks"]) == pytest.approx(pruned,
                                                                                  abs=1e-12)
    assert sparse_start.checkpoint_sparsity(start["zeros_only"]) == pytest.approx(zeros,
                                                                                  abs=1e-12)
    assert sparse_start.checkpoint_sparsity(_dir(start, "dense", start["params"])) == 0.0
    # bf16 weights in several shards, -0.0 counted as zero (its sign bit is set).
    negative = jax.tree.map(lambda w: np.where(w == 0, -0.0, w).astype(w.dtype), start["pruned"])
    bf16 = _dir(start, "zeros_bf16", negative, dtype="bfloat16", max_shard_bytes=40_000)
    assert len(list(bf16.glob("model-*.safetensors"))) > 2
    assert sparse_start.checkpoint_sparsity(bf16) == pytest.approx(zeros, abs=1e-12)


def test_checkpoint_sparsity_refuses_what_is_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sparse_start.checkpoint_sparsity(tmp_path / "nothing")


@pytest.mark.parametrize("case, message", [
    (lambda s: ({"hf_path": s["with_masks"]}, {"masks_path": str(s["with_masks"] / "masks")}),
     r"sparsity.init='magnitude' and sparsity.masks_path"),
    (lambda s: ({"hf_path": s["with_masks"]}, {}),
     r"sparsity.init='magnitude' would replace the mask of .*with_masks/masks"),
    (lambda s: ({"hf_path": s["zeros_only"]}, {}),
     r"sparsity.init='magnitude' would replace the mask of .*zeros_only \(50\.\d% of its "
     r"target weights are exact zeros\)"),
], ids=["masks_path", "masks_dir", "sparse_zeros"])
def test_a_static_mask_never_replaces_a_sparse_start(start, tmp_path, case, message):
    # Catches: sparsity.init silently overriding sparsity.masks_path or the checkpoint's own
    # mask (its pruned weights then trained back, a mask other than the one asked for kept).
    where, sparsity = case(start)
    config = run_config(start, where["hf_path"], init="magnitude", sparsity=0.3, keep=True,
                        **sparsity)
    with pytest.raises(ValueError, match=message):
        sparse_start.check_sparsity_config(config)
    with pytest.raises(ValueError, match=message):
        train_command.train(config, str(tmp_path / "run"))
    assert no_checkpoint_written(tmp_path / "run")
    # A dense checkpoint is what a static mask is for (prune it at the start).
    sparse_start.check_sparsity_config(
        run_config(start, _dir(start, "dense", start["params"]), init="magnitude",
                   sparsity=0.3, keep=True))
