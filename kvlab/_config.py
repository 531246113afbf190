"""Strict parsing of config dictionaries into dataclasses.

Every config in kvlab (the model, each mixer, norms, MLPs) is a dataclass.
YAML and Hydra hand us plain dicts; this module turns them into dataclasses
and refuses anything it does not understand, so a typo such as
``n_kv_head: 2`` is an error naming the key rather than a silently ignored
setting. Errors carry the dotted path of the field (``mixers.A.n_heads``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def check_keys(d: Mapping[str, Any], valid: list[str], path: str) -> None:
    """Raise ValueError for the first key of ``d`` not in ``valid``."""
    for key in d:
        if key not in valid:
            where = f"{path}.{key}" if path else str(key)
            raise ValueError(f"{where}: unknown key; valid keys are {', '.join(valid)}")


def from_dict(cls: type[T], d: Mapping[str, Any] | T, path: str = "") -> T:
    """Build dataclass ``cls`` from mapping ``d``, rejecting unknown keys.

    Nested dataclass fields are parsed recursively; type checks are left to
    the dataclass's own ``__post_init__`` (see :func:`check_int` and friends),
    which knows what values are valid and can say so.
    """
    if isinstance(d, cls):
        return d
    if not isinstance(d, Mapping):
        raise ValueError(f"{path or cls.__name__}: expected a mapping of settings, got {d!r}")
    check_keys(d, field_names(cls), path)
    check_types(cls, d, path)
    hints = _type_hints(cls)
    kwargs = {}
    for key, value in d.items():
        sub = _dataclass_in(hints[key])
        if sub is not None and isinstance(value, Mapping):
            value = from_dict(sub, value, f"{path}.{key}" if path else key)
        kwargs[key] = value
    return cls(**kwargs)


def check_types(cls: type, d: Mapping[str, Any], path: str = "") -> None:
    """Raise ValueError for the first value of ``d`` that is not of its field's annotated type.

    The shape only (a number where a number goes, a list of integers where
    one goes): what values are valid is each dataclass's own check. A nested
    dataclass field takes a mapping of its settings (parsed later) or the
    dataclass itself.
    """
    hints = _type_hints(cls)
    for key, value in d.items():
        if key in hints and not _matches(value, hints[key]):
            where = f"{path}.{key}" if path else str(key)
            raise ValueError(f"{where}={value!r} must be {_describe(hints[key])}")


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)  # evaluates every annotation's text: once per class


def _matches(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    if dataclasses.is_dataclass(hint):
        return isinstance(value, (hint, Mapping))
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple)) and all(_matches(v, args[0]) for v in value) if args else True
    if origin is dict:
        return isinstance(value, Mapping) and all(_matches(v, args[1]) for v in value.values()) if args else True
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # an annotation this check does not understand: leave it to the dataclass


def _describe(hint: Any) -> str:
    if dataclasses.is_dataclass(hint):
        return "a mapping of settings"
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin in (list, tuple):
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s" if args else "a list"
    if origin is dict:
        return "a mapping"
    names = {type(None): "null", bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass type named by a field's annotation, if any (``X | None`` too)."""
    if dataclasses.is_dataclass(hint):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            if dataclasses.is_dataclass(arg):
                return arg
    return None


def to_dict(obj: Any) -> Any:
    """Plain nested dicts/lists of a config, for YAML/JSON (inverse of from_dict)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
        kind = getattr(type(obj), "kind", None)
        if isinstance(kind, str) and "kind" not in out:
            out = {"kind": kind, **out}
        return out
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def check_int(value: Any, name: str, *, minimum: int | None = None, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}={value!r} must be an integer")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}={value} must be >= {minimum}")


def check_float(value: Any, name: str, *, positive: bool = False, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}={value!r} must be a number")
    if not math.isfinite(value):
        raise ValueError(f"{name}={value} must be a finite number")
    if positive and not value > 0:
        raise ValueError(f"{name}={value} must be > 0")


def check_bool(value: Any, name: str) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} must be true or false")


def check_choice(value: Any, name: str, choices: typing.Iterable[str]) -> None:
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}")


def dotted_items(d: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """The leaves of a nested dict as (dotted name, value), in order: ``{"a": {"b": 1}}`` -> ``[("a.b", 1)]``."""
    items = []
    for k, v in d.items():
        items += dotted_items(v, f"{prefix}{k}.") if isinstance(v, Mapping) else [(f"{prefix}{k}", v)]
    return items


def differences(ours: Any, theirs: Any, path: str = "") -> list[str]:
    """Dotted paths where two plain configs (dicts, lists, values) differ, with both values."""
    if isinstance(ours, Mapping) and isinstance(theirs, Mapping):
        found = []
        for key in sorted(set(ours) | set(theirs), key=str):
            where = f"{path}.{key}" if path else str(key)
            if key not in ours or key not in theirs:
                found.append(f"{where}: {ours.get(key, '(absent)')!r} vs {theirs.get(key, '(absent)')!r}")
            else:
                found += differences(ours[key], theirs[key], where)
        return found
    if isinstance(ours, (list, tuple)) and isinstance(theirs, (list, tuple)) and len(ours) == len(theirs):
        pairs = enumerate(zip(ours, theirs, strict=True))
        return [d for i, (a, b) in pairs for d in differences(a, b, f"{path}[{i}]")]
    return [] if ours == theirs else [f"{path}: {ours!r} vs {theirs!r}"]


def first_non_finite(value: Any, path: str = "") -> tuple[str, float] | None:
    """(dotted path, value) of the first inf/nan float inside ``value`` (dicts, lists, dataclasses), or None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else (path, value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, Mapping):
        items = ((f"{path}.{k}" if path else str(k), v) for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for where, sub in items:
        found = first_non_finite(sub, where)
        if found is not None:
            return found
    return None


def check_finite(value: Any, path: str = "") -> None:
    """Raise ValueError naming the first inf/nan float anywhere inside ``value``."""
    found = first_non_finite(value, path)
    if found is not None:
        raise ValueError(f"{found[0]}={found[1]} must be a finite number")


def load_yaml(path) -> Any:
    """The YAML document at ``path``; a file that does not parse is a ValueError naming the file and line."""
    import yaml

    try:
        with open(path) as f:
            return yaml.safe_load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        raise ValueError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None


# Presets renamed since users first ran them: the old name, the new one and why. A command line naming the old
# one is told so (Hydra would only list every preset), and so is ModelConfig.from_preset.
RENAMED_PRESETS = {
    "goldfinch": (
        "rwkv6_shared_mla",
        "on 2026-12-06: GoldFinch's layout without its TokenCat and Finch-C2 layers is not GoldFinch, so not its name",
    ),  # fmt: skip
}


def config_dir() -> Path:
    """The shipped Hydra tree: ``kvlab/configs`` in an installed kvlab (package data), or ``configs/`` beside the
    package in a checkout (an editable install included)."""
    package = Path(__file__).resolve().parent
    installed = package / "configs"
    return installed if (installed / "train.yaml").is_file() else package.parent / "configs"
