"""configs/: every experiment and variant builds, variant rows are named fields, the section
defaults have one home (configs/blocks.py), and configs/ imports nothing of the library."""

import ast
import dataclasses
import importlib
import pathlib

import ml_collections
import pytest

from configs import blocks, mediswift, sparse, sparse50, sparse70, spdf

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
EXPERIMENTS = sorted(p.stem for p in CONFIGS.glob("*.py") if p.stem not in ("__init__", "blocks"))


def _variants(name: str) -> dict:
    return getattr(importlib.import_module(f"configs.{name}"), "VARIANTS", {})


CASES = [(name, variant) for name in EXPERIMENTS for variant in (None, *_variants(name))]


@pytest.mark.parametrize("name, variant", CASES)
def test_every_variant_builds(name, variant):
    module = importlib.import_module(f"configs.{name}")
    config = module.get_config(variant)
    assert isinstance(config, ml_collections.ConfigDict)
    config.to_dict()  # every value is plain config data


@pytest.mark.parametrize("name", [n for n in EXPERIMENTS if _variants(n)])
def test_variant_rows_are_named_and_unknown_variants_refused(name):
    module = importlib.import_module(f"configs.{name}")
    for row in module.VARIANTS.values():
        assert dataclasses.is_dataclass(row) or isinstance(row, dict), row
    with pytest.raises(ValueError, match=r"unknown variant 'nope'.*choose one of"):
        module.get_config("nope")


ROWS = [blocks.Run, sparse.Continued, mediswift.Prompt, spdf.Recipe, sparse70.Recipe]


def _a_row(cls) -> dict:
    for name in EXPERIMENTS:
        for row in _variants(name).values():
            if type(row) is cls:
                return dataclasses.asdict(row)
    raise AssertionError(f"no variant uses {cls.__name__}")


@pytest.mark.parametrize("cls", ROWS, ids=lambda c: f"{c.__module__}.{c.__name__}")
def test_rows_refuse_unknown_missing_and_positional_fields(cls):
    fields = _a_row(cls)
    assert cls(**fields) == cls(**dict(reversed(fields.items())))  # by name, in any order
    with pytest.raises(TypeError, match="'stpes'"):
        cls(**fields, stpes=3)
    for name in fields:
        with pytest.raises(TypeError, match=f"'{name}'"):
            cls(**{k: v for k, v in fields.items() if k != name})
    with pytest.raises(TypeError, match="positional"):
        cls(*fields.values())
    with pytest.raises(dataclasses.FrozenInstanceError):
        cls(**fields).seq_len = 1


@pytest.mark.parametrize("builder", [blocks.pruning, blocks.calibration, blocks.perplexity_eval,
                                     blocks.quant, blocks.finetune, blocks.soft_prompt,
                                     blocks.distill])
def test_section_builders_refuse_unknown_keys(builder):
    section = builder()
    first = next(iter(section))
    assert builder(**{first: section[first]}) == section
    with pytest.raises(ValueError, match=r"has no key 'sparsty'"):
        builder(sparsty=0.7)


def test_configs_import_no_library_module():
    offenders = []
    for path in sorted(CONFIGS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            offenders += [f"{path.name}:{node.lineno} {n}" for n in names
                          if n.split(".")[0] == "sparse_llama"]
    assert not offenders


def test_prune_and_quantize_configs_do_not_import_each_other():
    for name, other in (("prune", "quantize"), ("quantize", "prune")):
        tree = ast.parse((CONFIGS / f"{name}.py").read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                    for a in n.names} | {a.name for n in ast.walk(tree)
                                         if isinstance(n, ast.Import) for a in n.names}
        assert other not in imported and f"configs.{other}" not in imported


def test_prune_stage_sections_are_complete():
    """A recipe's prune stage carries the whole `pruning` / `calibration` sections of
    configs/prune.py, with the stage's own values."""
    stage = blocks.prune_stage(0.7, method="wanda", profile="owl", num_samples=16, seq_len=64)
    prune = importlib.import_module("configs.prune").get_config()
    assert list(stage.pruning) == list(prune.pruning)
    assert list(stage.calibration) == list(prune.calibration)
    assert (stage.pruning.method, stage.pruning.sparsity, stage.pruning.profile,
            stage.pruning.keep_zeros) == ("wanda", 0.7, "owl", True)
    assert (stage.calibration.num_samples, stage.calibration.seq_len, stage.calibration.seed,
            stage.calibration.batch_size) == (16, 64, 0, 8)


def test_sparse70_full_is_the_papers_table():
    """arXiv 2405.03594 at full size: 128 x 2048 calibration windows, 45B tokens at 50% and
    100B more at 70%, global batch 1024 x 2048 tokens in 64 micro-batches, fsdp everywhere."""
    c = sparse70.get_config()
    assert c.model.preset == "llama2_7b"
    assert c.stages == ("dense", "prune50", "sparse50", "prune70", "sparse70", "eval_final",
                        "export")
    assert (c.prune50.pruning.sparsity, c.prune70.pruning.sparsity) == (0.5, 0.7)
    for name in ("prune50", "prune70"):
        cal = c[name].calibration
        assert (c[name].pruning.method, cal.num_samples, cal.seq_len) == ("sparsegpt", 128, 2048)
    assert (c.sparse50.tokens, c.sparse70.tokens) == (45e9, 100e9)
    assert c.data.seq_len == 2048
    for name in ("sparse50", "sparse70"):
        assert (c[name].train.batch_size, c[name].train.grad_accum) == (1024, 64)
        assert c[name].optimizer.lr == 1e-4
        assert c[name].sparse
    assert (c.mesh.data, c.mesh.fsdp) == (1, -1)
    c50 = sparse50.get_config()
    assert c50.sparse50.tokens == 45e9 and "prune70" not in c50
