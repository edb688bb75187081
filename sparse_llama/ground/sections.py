"""One way to check a config section: turn it into a frozen dataclass (a typed spec).

Commands read a run's ConfigDict once, section by section, with `spec_from_section`; the
library takes the specs. A key the spec does not know is refused with the key and the allowed
ones (a typo such as `pruning.sparsty` must not pass silently as a default); a key the section
lacks takes the spec's default, and a spec field without one must be given. Values are
checked against the field's type where that is a plain type (bool, int, float, str, tuple).
"""

import dataclasses
import types
import typing

import ml_collections


class SectionError(ValueError):
    """A config section that does not fit its spec (the message names the key and the fix)."""


def _plain(hint):
    """The plain types a value of `hint` may have (None: not checked)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        kinds = [_plain(h) for h in typing.get_args(hint)]
        return None if any(k is None for k in kinds) else tuple(t for k in kinds for t in k)
    if origin is tuple or hint is tuple:
        return (tuple, list)
    if hint is float:
        return (int, float)
    if hint in (bool, int, str, type(None)):
        return (hint,)
    return None


def _check_type(where: str, key: str, value, hint) -> object:
    kinds = _plain(hint)
    if kinds is None:
        return value
    if isinstance(value, bool) and bool not in kinds:
        ok = False  # True is an int to Python, never to a config
    else:
        ok = isinstance(value, kinds)
    if not ok:
        names = " or ".join(sorted({k.__name__ for k in kinds}))
        raise SectionError(f"{where}.{key}={value!r} must be {names}")
    scalars = _plain_scalar(hint)
    if (isinstance(value, int) and not isinstance(value, bool) and float in scalars
            and int not in scalars):
        return float(value)  # 1 for a float field: the spec holds 1.0
    return tuple(value) if isinstance(value, list) else value


def _plain_scalar(hint) -> tuple:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return tuple(t for h in typing.get_args(hint) for t in _plain_scalar(h))
    return (hint,)


def spec_from_section(cls, section: ml_collections.ConfigDict | dict | None, where: str, *,
                      home: str | None = None, **overrides):
    """`cls(**section)` for a frozen dataclass `cls`, every key checked (see the module doc).

    `where` is the section's name in the config (`pruning`, `prune50.calibration`), used in
    every message; `home` the configs/blocks.py function that builds the section, named when
    the section is missing; `overrides` are values the caller sets (not taken from the config).
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if section is None and home is not None:
        raise SectionError(f"the config has no {where} section; add config.{where} = "
                           f"configs.{home}")
    hints = typing.get_type_hints(cls)
    values = dict(section.items()) if section is not None else {}  # ConfigDict or dict
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise SectionError(f"{where} has no key {', '.join(map(repr, unknown))}; the keys of "
                           f"{where} are {sorted(fields)}")
    values.update(overrides)
    missing = sorted(n for n, f in fields.items() if n not in values
                     and f.default is dataclasses.MISSING
                     and f.default_factory is dataclasses.MISSING)
    if missing:
        raise SectionError(f"{where} lacks {', '.join(map(repr, missing))}; set "
                           f"--config.{where}.{missing[0]}=...")
    checked = {k: _check_type(where, k, v, hints.get(k)) for k, v in values.items()}
    return cls(**checked)
