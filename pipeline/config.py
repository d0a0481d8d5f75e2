"""Typed configuration: dataclasses built from TOML tables, unknown keys rejected by name.

Every stage owns a small kw_only dataclass with a docstring per field (as a comment) and
validates itself in ``__post_init__``. ``from_mapping`` walks nested dataclasses so that an
error names the full dotted key, e.g. ``train.lr`` — the thing the user must edit.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from pipeline.errors import ConfigError

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(
                f"{source}: '{key}' must be a table, got {type(value).__name__}",
                f"write it as a [{key}] section",
            )
        return from_mapping(tp, value, source=source, prefix=key)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: '{key}' must be a list, got {value!r}", f"write it as {key} = [ ... ]")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(
                f"{source}: '{key}' is {value!r}, which is not one of {', '.join(map(repr, allowed))}",
                f"set {key} to one of the allowed values",
            )
        return value
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool):
        raise ConfigError(f"{source}: '{key}' must be an integer, got {value!r}", f"set {key} to a whole number")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(
            f"{source}: '{key}' must be {_type_name(tp)}, got {type(value).__name__} {value!r}",
            f"set {key} to a value of type {_type_name(tp)}",
        )
    return value


def from_mapping(cls: type[T], data: Mapping[str, Any], *, source: str = "config", prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; every unknown or mistyped key is named.

    ``source`` names the file for the message; ``prefix`` is the dotted path of this table.
    ``__post_init__`` validation errors (ValueError) are re-raised as ConfigError naming
    the table.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    dotted = (lambda k: f"{prefix}.{k}") if prefix else (lambda k: k)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{source}: unknown key '{dotted(unknown[0])}'" + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""),
            f"remove it or use one of: {', '.join(sorted(fields))}",
        )
    kwargs = {name: _coerce(data[name], hints[name], dotted(name), source) for name in fields if name in data}
    missing = [n for n, f in fields.items() if n not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{source}: missing required key '{dotted(missing[0])}'", f"add {dotted(missing[0])} = ...")
    try:
        return cls(**kwargs)
    except ValueError as exc:
        where = prefix or "the top level"
        raise ConfigError(f"{source}: invalid value in [{where}]: {exc}", "fix the value named above") from None


def to_mapping(obj: Any) -> dict[str, Any]:
    """The plain-dict form of a config dataclass (for recording it in the ledger)."""
    return dataclasses.asdict(obj)


def check(condition: bool, message: str) -> None:
    """Validation helper for ``__post_init__``: raise ValueError naming the field."""
    if not condition:
        raise ValueError(message)
