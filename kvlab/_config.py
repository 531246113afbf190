"""Strict parsing of config dictionaries into dataclasses.

Every config in kvlab (the model, each mixer, norms, MLPs) is a dataclass.
YAML and Hydra hand us plain dicts; this module turns them into dataclasses
and refuses anything it does not understand, so a typo such as
``n_kv_head: 2`` is an error naming the key rather than a silently ignored
setting. Errors carry the dotted path of the field (``mixers.A.n_heads``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
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
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in d.items():
        sub = _dataclass_in(hints[key])
        if sub is not None and isinstance(value, Mapping):
            value = from_dict(sub, value, f"{path}.{key}" if path else key)
        kwargs[key] = value
    return cls(**kwargs)


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
    if positive and not value > 0:
        raise ValueError(f"{name}={value} must be > 0")


def check_bool(value: Any, name: str) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} must be true or false")


def check_choice(value: Any, name: str, choices: typing.Iterable[str]) -> None:
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}")
