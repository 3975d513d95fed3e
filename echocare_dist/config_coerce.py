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


def _item_types(args: tuple, value, key: str) -> list:
    """The element types of a `tuple[X, ...]` or fixed `tuple[X, Y]` annotation for `value`."""
    if len(args) == 2 and args[1] is Ellipsis:
        return [args[0]] * len(value)
    if len(value) != len(args):
        raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}: {list(value)!r}")
    return list(args)


def _first_member(convert, tp, value, key: str):
    """convert(member) for the first non-None member of the Union `tp` that accepts the value."""
    errors = []
    for arg in typing.get_args(tp):
        if arg is type(None):
            continue
        try:
            return convert(arg)
        except ConfigError as exc:
            errors.append(exc)
    if len(errors) == 1:  # Optional[X]: X's own message names the element that is wrong
        raise errors[0]
    raise ConfigError(f"{key}: value {value!r} does not match {_type_name(tp)}")


def _coerce(value, tp, key: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _first_member(lambda arg: _coerce(value, arg, key), tp, value, key)
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
        if args:
            return tuple(_coerce(item, item_tp, f"{key}[{i}]")
                         for i, (item, item_tp) in enumerate(zip(value, _item_types(args, value, key))))
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


# --------------------------------------------------------------------------------------
# `--set key=value`: the text is read with the type of the field it sets, never guessed by YAML
# (which turns run_name=2024-01-15 into a date and experiment=on into True).
# --------------------------------------------------------------------------------------
TRUE_WORDS, FALSE_WORDS = ("true", "1"), ("false", "0")
NULL_WORDS = ("null", "none", "~")


def field_type(cls, parts: list[str]):
    """The annotation of the dotted field `parts` inside dataclass `cls` (sections included)."""
    tp, done = cls, []
    for part in parts:
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"{'.'.join(done)} is a value, not a section: cannot set {'.'.join(parts)!r}")
        hints = typing.get_type_hints(tp)
        if part not in hints:
            where = ".".join(done) or "top level"
            raise ConfigError(f"unknown key {'.'.join(done + [part])!r} in {where}; "
                              f"allowed: {sorted(f.name for f in dataclasses.fields(tp))}")
        tp, done = hints[part], done + [part]
    return tp


def _parse_list(raw: str, key: str) -> list:
    """`[a, "b c", 3]` -> ["a", "b c", "3"]: YAML's structure, but every scalar left as text."""
    import yaml
    try:
        value = yaml.load(raw, Loader=yaml.BaseLoader)
    except yaml.YAMLError as exc:
        problem = str(exc).splitlines()[0]
        raise ConfigError(f"{key}: malformed list {raw!r} ({problem}); write it like [1, 2, 3]") from None
    if not isinstance(value, list) or any(not isinstance(v, str) for v in value):
        raise ConfigError(f"{key}: expected a list of values like [1, 2, 3], got {raw!r}")
    return value


def _parse_records(raw: str, cls, key: str) -> list[dict]:
    """`[{until_step: 100, img_size: 128}, {until_step: null}]` for a `tuple[Dataclass, ...]` field:
    YAML's structure, then each value read with the type of its field like any `--set` text."""
    import yaml
    try:
        value = yaml.load(raw, Loader=yaml.BaseLoader)
    except yaml.YAMLError as exc:
        problem = str(exc).splitlines()[0]
        raise ConfigError(f"{key}: malformed list {raw!r} ({problem}); write it like [{{a: 1}}, {{a: 2}}]") from None
    if not isinstance(value, list) or any(not isinstance(v, dict) for v in value):
        raise ConfigError(f"{key}: expected a list of mappings like [{{a: 1}}, {{a: 2}}], got {raw!r}")
    records = []
    for i, record in enumerate(value):
        parsed = {}
        for name, text in record.items():
            item_key = f"{key}[{i}].{name}"
            if not isinstance(text, str):
                raise ConfigError(f"{item_key}: expected a single value, got {text!r}")
            parsed[name] = parse_text(text, field_type(cls, [name]) if name in _field_names(cls) else str, item_key)
        records.append(parsed)
    return records  # from_dict names unknown keys and checks the values


def _field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def parse_text(raw: str, tp, key: str):
    """The value of `--set key=raw` for a field annotated `tp`; the result still goes through
    `from_dict`, which checks ranges of Literal values and finiteness."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    text = raw.strip()
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and text.lower() in NULL_WORDS:
            return None
        return _first_member(lambda arg: parse_text(raw, arg, key), tp, raw, key)
    if dataclasses.is_dataclass(tp):
        raise ConfigError(f"{key}: expected a mapping (a section: set its keys one by one, "
                          f"e.g. --set {key}.KEY=VALUE), got {raw!r}")
    if origin is Literal:
        for arg in args:
            if str(arg) == text:
                return arg
        return text  # from_dict names the allowed values (or a DEPRECATED_VALUES rename applies)
    if tp is tuple or origin is tuple:
        if args and dataclasses.is_dataclass(args[0]):
            return _parse_records(raw, args[0], key)
        items = _parse_list(raw, key)
        if not args:
            return items
        return [parse_text(item, item_tp, f"{key}[{i}]")
                for i, (item, item_tp) in enumerate(zip(items, _item_types(args, items, key)))]
    if tp is bool:
        if text.lower() in TRUE_WORDS:
            return True
        if text.lower() in FALSE_WORDS:
            return False
        raise ConfigError(f"{key}: expected true/false (or 1/0), got {raw!r}")
    if tp is int:
        try:
            return int(text, 10)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {raw!r}") from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {raw!r}") from None
    if tp is dict or origin is dict:
        import yaml
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            value = exc
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping like {{a: 1, b: 2}}, got {raw!r}") from None
        return value
    return raw  # str (and anything untyped): the text exactly as given
