"""Frozen configs filled the same way from a TOML file, CLI flags or Python.

``from_mapping(Cls, data, where)`` checks every key against the dataclass's fields (an unknown key
is an error naming it and the file), checks each value's type, and builds nested dataclasses.
A dataclass validates ranges in its own ``__post_init__`` by raising ``UsageError``.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from edgekd.device.errors import UsageError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

T = TypeVar("T", bound="DataclassInstance")


def require(cond: bool, msg: str) -> None:
    """A config's range check (in its ``__post_init__``): ``msg`` says what to set instead."""
    if not cond:
        raise UsageError(msg)


def power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def read_toml(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"config file {path} does not exist")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path} is not valid TOML: {e}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not a UTF-8 text file") from None


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, where)
            except UsageError as e:
                errors.append(e)
        raise errors[0] if errors else UsageError(f"{where}: {key} has the wrong type")
    if origin is typing.Literal:
        if value not in args:
            raise UsageError(f"{where}: {key} = {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise UsageError(f"{where}: {key} must be a list, got {type(value).__name__}")
        inner = args[0] if args else Any
        items = tuple(_coerce(v, inner, f"{key}[{i}]", where) for i, v in enumerate(value))
        return items if origin is tuple else list(items)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise UsageError(f"{where}: {key} must be a table, got {type(value).__name__}")
        return dict(value)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise UsageError(f"{where}: [{key}] must be a table")
        return from_mapping(tp, value, where, prefix=f"{key}.")
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"{where}: {key} must be a number, got {value!r}")
        if not math.isfinite(value):  # nan passes every `<= 0` check after it: refuse it here, once
            raise UsageError(f"{where}: {key} = {value} must be a finite number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"{where}: {key} must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise UsageError(f"{where}: {key} must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise UsageError(f"{where}: {key} must be a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise UsageError(f"{where}: {key} must be a path string, got {value!r}")
        return Path(value)
    if isinstance(tp, type) and not isinstance(value, tp):
        raise UsageError(f"{where}: {key} must be {_type_name(tp)}, got {value!r}")
    return value


def from_mapping(cls: type[T], data: Mapping[str, Any], where: str = "config", prefix: str = "") -> T:
    """Build the dataclass ``cls`` from ``data``; errors name the key and ``where`` (a file name)."""
    if not isinstance(data, Mapping):
        raise UsageError(f"{where}: expected a table of settings")
    hints = typing.get_type_hints(cls, vars(sys.modules[cls.__module__]))
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise UsageError(
            f"{where}: unknown key '{prefix}{unknown[0]}' (known: {', '.join(sorted(fields))})"
        )
    kwargs = {name: _coerce(value, hints[name], prefix + name, where) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise UsageError(f"{where}: {e}") from None
    except UsageError as e:  # a range check in __post_init__: say which file it came from
        if str(e).startswith(where):
            raise
        raise UsageError(f"{where}: {e}") from None


def to_dict(obj: Any) -> Any:
    """A JSON/TOML-ready copy of a config (paths as strings, tuples as lists); a config class that
    has a file shape of its own says so with a ``to_dict`` method (``TargetProfile``)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        own = getattr(type(obj), "to_dict", None)
        if own is not None:
            return own(obj)
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj
