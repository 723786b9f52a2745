"""Frozen config dataclasses from plain JSON values, every value checked against its field's type.

`build_dataclass(cls, d)` is the one reader of the config files (`AvatarConfig`, `TrainConfig`): a value of the
wrong type (`"image_size": "128"`, a number where a nested object belongs, a NaN) is a ConfigError naming the field
by its path (`unet.block_out_channels[2]`), never a TypeError from deep inside the dataclass. Lists become tuples.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

from .errors import ConfigError

_NAMES = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string", dict: "a JSON object"}


def build_dataclass(cls, d: Any, where: str = ""):
    """`cls(**d)` for a (nested) frozen dataclass, after checking `d`'s keys and every value's type."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where or cls.__name__} must be a JSON object, got {_show(d)} (give an object of "
                          f"{cls.__name__}'s fields)")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(str(k) for k in d if k not in fields)
    if unknown:
        raise ConfigError(f"{where or cls.__name__} has no field(s) {unknown} (remove them from the config)")
    required = [name for name, f in fields.items() if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING and name not in d]
    if required:
        raise ConfigError(f"{where or cls.__name__} lacks the field(s) {required} (add them to the config)")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _value(value, hints[name], f"{where}.{name}" if where else name) for name, value in d.items()}
    return cls(**kwargs)


def _value(value: Any, hint: Any, where: str) -> Any:
    """`value` checked against the type `hint` (and converted: lists -> tuples, ints -> float for floats)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        arms = [a for a in args if a is not type(None)]
        if len(arms) == 1:
            return _value(value, arms[0], where)
        # `int | tuple[int, ...]`: a list is checked as the tuple (so its error names the item), anything else as the
        # scalar
        lists = [a for a in arms if typing.get_origin(a) is tuple]
        if isinstance(value, (list, tuple)) and lists:
            return _value(value, lists[0], where)
        if not isinstance(value, (list, tuple)) and len(lists) < len(arms):
            for arm in (a for a in arms if a not in lists):
                try:
                    return _value(value, arm, where)
                except ConfigError:
                    pass
        kinds = " or ".join("a list" if typing.get_origin(a) is tuple else _NAMES[a] for a in arms)
        raise ConfigError(f"{where} must be {kinds}, got {_show(value)} (fix the value in the config)")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {_show(value)} (write [...] there)")
        items = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(items) != len(value):
            raise ConfigError(f"{where} must be a list of {len(items)} values, got {len(value)}")
        return tuple(_value(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, items)))
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, where)
    ok = isinstance(value, hint) and (hint is bool or not isinstance(value, bool))
    if hint is float:
        ok = is_finite_number(value)
        value = float(value) if ok else value
    if not ok:
        raise ConfigError(f"{where} must be {_NAMES[hint]}, got {_show(value)} (fix the value in the config)")
    return value


def check_positive(owner: str, **values) -> None:
    """ConfigError naming the first value (`owner.name`) that is not a positive integer, or not a non-empty tuple
    of them."""
    for name, value in values.items():
        items = value if isinstance(value, tuple) else (value,)
        if not items or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in items):
            kind = "a non-empty list of positive integers" if isinstance(value, tuple) else "a positive integer"
            raise ConfigError(f"{owner + '.' if owner else ''}{name} must be {kind}, got {_show(value)}")


def is_finite_number(value: Any) -> bool:
    """An int or float (not a bool) that is finite as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond the float range
        return False


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{type(value).__name__} {text[:57]}..."
