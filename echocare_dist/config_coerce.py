"""Plain dicts (YAML, `--set`, checkpoints) <-> config dataclasses, typed by the field annotations.

Unknown keys and values of the wrong type fail with the full dotted key in the message.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Literal

from .config_sections import ConfigError


def to_plain(obj):
    """dicts / lists / scalars only (tuples become lists), as YAML and JSON write them."""
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value, tp, key: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: value {value!r} does not match {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: value {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, key)
    if tp is tuple or origin is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        for item in value:
            if isinstance(item, float) and not math.isfinite(item):
                raise ConfigError(f"{key}: expected finite numbers, got {list(value)!r}")
        return tuple(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "3e-4" (no dot) as a string; accept what Python reads as a number.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        # No config value means "infinite" or "undefined": inf / nan (YAML .inf / .nan) only ever come
        # from a typo or a bad sweep, and optim.lr=inf trains NaN from step 1.
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls, data: dict, prefix: str = ""):
    """An instance of dataclass `cls`: defaults, replaced by the (possibly partial) `data`."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        where = prefix or "top level"
        raise ConfigError(f"unknown key(s) {', '.join(repr(prefix + '.' + u if prefix else u) for u in unknown)} "
                          f"in {where}; allowed: {sorted(known)}")
    obj = cls()
    for name, value in data.items():
        setattr(obj, name, _coerce(value, hints[name], f"{prefix}.{name}" if prefix else name))
    return obj
