"""ground.sections: a config section becomes a typed spec, or a message naming the key."""

import dataclasses

import ml_collections
import pytest

from sparse_llama.ground.sections import SectionError, spec_from_section


@dataclasses.dataclass(frozen=True)
class _Spec:
    method: str
    sparsity: float = 0.5
    steps: int = 10
    keep: bool = True
    layers: tuple = ()
    note: str | None = None


def test_values_and_defaults():
    s = spec_from_section(_Spec, ml_collections.ConfigDict({"method": "m", "sparsity": 1,
                                                           "layers": [1, 2], "keep": False}),
                          "pruning")
    assert s == _Spec(method="m", sparsity=1.0, steps=10, keep=False, layers=(1, 2))
    # an int given for a float field becomes a float; a bool stays a bool (bool is an int)
    assert type(s.sparsity) is float and s.keep is False and type(s.steps) is int


def test_unknown_key_is_named_with_the_allowed_ones():
    with pytest.raises(SectionError, match=r"pruning has no key 'sparsty'.*'sparsity'"):
        spec_from_section(_Spec, {"method": "m", "sparsty": 0.7}, "pruning")


def test_missing_section_names_its_home():
    with pytest.raises(SectionError, match=r"no sat section; add config.sat = configs.blocks"):
        spec_from_section(_Spec, None, "sat", home="blocks.sat()")


def test_missing_required_key():
    with pytest.raises(SectionError, match=r"prune50.pruning lacks 'method'"):
        spec_from_section(_Spec, {}, "prune50.pruning")


@pytest.mark.parametrize("key, value", [("steps", 1.5), ("steps", True), ("keep", 1),
                                        ("sparsity", "0.5"), ("note", 3)])
def test_wrong_type(key, value):
    with pytest.raises(SectionError, match=rf"pruning.{key}="):
        spec_from_section(_Spec, {"method": "m", key: value}, "pruning")


def test_overrides_are_not_config_keys():
    s = spec_from_section(_Spec, {"method": "m"}, "pruning", steps=3)
    assert s.steps == 3
