"""Typed configuration: dataclasses built from TOML tables, unknown keys rejected by name.

Every stage owns a small kw_only dataclass with a docstring per field (as a comment) and
validates itself in ``__post_init__``. ``from_mapping`` walks nested dataclasses so that an
error names the full dotted key, e.g. ``train.lr`` — the thing the user must edit.

A recipe is checked whole before any stage runs, and every problem is reported at once (an
operator fixing one value per attempt loses an attempt per value): ``collect`` gathers the
problems of every table — unknown keys, wrong types, values ``__post_init__`` refuses — and
``ConfigError`` carries them all. ``check`` inside ``__post_init__`` records into the
collection while ``from_mapping`` builds a table, and raises ``ValueError`` when a config
class is constructed directly.
"""

from __future__ import annotations

import contextvars
import dataclasses
import difflib
import json
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from pipeline.errors import ConfigError, Problem

T = TypeVar("T")

# The problems of the table being built; None outside from_mapping, where check() raises.
_SINK: contextvars.ContextVar[list[tuple[str, str, str]] | None] = contextvars.ContextVar("config_problems", default=None)


class _Invalid(Exception):
    """Internal: a value (or a nested table) that cannot be used, with its problems."""

    def __init__(self, problems: list[Problem], partial: Any = None) -> None:
        super().__init__(problems[0].message if problems else "invalid")
        self.problems = problems
        # A nested table built with defaults in place of its bad values, for cross-table checks.
        self.partial = partial


_TYPE_WORDS: dict[Any, str] = {int: "a whole number", float: "a number", str: "a string", bool: "true or false"}


def _type_name(tp: Any) -> str:
    return _TYPE_WORDS.get(tp) or str(getattr(tp, "__name__", tp))


def toml_value(value: Any) -> str:
    """``value`` as it would be written in a recipe (for messages that show a working value)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (int, float)):
        return repr(value)
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(value)


def _shown(value: Any) -> str:
    # A hostile recipe can hold a megabyte string or a 2,000-deep list: show its start only.
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, (list, tuple)):
        return "a list"
    text = toml_value(value) if isinstance(value, (bool, int, float, str)) else type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise _Invalid([Problem(key, f"must be a table, got {_shown(value)}", f"write it as a [{key}] section")])
        problems: list[Problem] = []
        obj = _build(typing.cast(type, tp), value, source, key, problems)
        if problems or obj is None:
            raise _Invalid(problems, partial=obj)
        return obj
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors: list[_Invalid] = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except _Invalid as exc:
                errors.append(exc)
        raise errors[0]
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _Invalid([Problem(key, f"must be a list, got {_shown(value)}", f"write it as {key} = [ ... ]")])
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        items, bad = [], []
        for i, v in enumerate(value):
            try:
                items.append(_coerce(v, item_tp, f"{key}[{i}]", source))
            except _Invalid as exc:
                bad.extend(exc.problems)
                if exc.partial is not None:
                    items.append(exc.partial)
        result = tuple(items) if origin is tuple else items
        if bad:
            raise _Invalid(bad, partial=result)
        return result
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if not isinstance(value, (str, int, float, bool)) or value not in allowed:
            raise _Invalid([Problem(key, f"is {_shown(value)}, which is not one of {', '.join(map(toml_value, allowed))}", f"set {key} to one of them")])
        return value
    if tp is Any:
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        # TOML has inf and nan; no setting of ours means either, and "lr = inf" would only
        # fail after the data stages had run.
        if isinstance(value, float) and not math.isfinite(value):
            raise _Invalid([Problem(key, f"is {_shown(value)}, not a finite number", f"set {key} to a finite number")])
        try:
            return float(value)
        except OverflowError:
            raise _Invalid([Problem(key, f"is {_shown(value)}, too large for a number", f"set {key} to a finite number")]) from None
    if tp is int and isinstance(value, bool):
        raise _Invalid([Problem(key, f"must be an integer, got {_shown(value)}", f"set {key} to a whole number")])
    if isinstance(tp, type) and not isinstance(value, tp):
        raise _Invalid([Problem(key, f"must be {_type_name(tp)}, got {_shown(value)}", f"set {key} to {_type_name(tp)}")])
    return value


def _unknown_key(name: str, dotted: str, fields: list[str]) -> Problem:
    close = difflib.get_close_matches(name, fields, n=1, cutoff=0.6)
    fix = f"did you mean '{close[0]}'?" if close else f"remove it or use one of: {', '.join(sorted(fields))}"
    return Problem(dotted, f"unknown key '{dotted}'", fix)


def _with_default(problem: Problem, fld: dataclasses.Field[Any]) -> Problem:
    """The problem, its fix naming the field's default as a value that works."""
    if fld.default is dataclasses.MISSING or dataclasses.is_dataclass(fld.default) or "default" in problem.fix:
        return problem
    return dataclasses.replace(problem, fix=f"{problem.fix}, e.g. the default {problem.key} = {toml_value(fld.default)}")


def _build(cls: type[T], data: Mapping[str, Any], source: str, prefix: str, problems: list[Problem]) -> T | None:
    """``cls`` from ``data``, appending every problem found to ``problems``.

    Returns the object when it could be built — with the good values and the defaults in
    place of the bad ones, so that checks across tables still run — or None.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    dotted = (lambda k: f"{prefix}.{k}") if prefix else (lambda k: k)
    for name in sorted(set(data) - set(fields), key=str):
        problems.append(_unknown_key(str(name), dotted(str(name)), list(fields)))
    kwargs: dict[str, Any] = {}
    for name, fld in fields.items():
        if name not in data:
            if fld.default is dataclasses.MISSING and fld.default_factory is dataclasses.MISSING:
                problems.append(Problem(dotted(name), f"missing required key '{dotted(name)}'", f"add {dotted(name)} = ..."))
            continue
        try:
            kwargs[name] = _coerce(data[name], hints[name], dotted(name), source)
        except _Invalid as exc:
            problems.extend(_with_default(p, fld) if p.key == dotted(name) else p for p in exc.problems)
            if exc.partial is not None:
                kwargs[name] = exc.partial
    if any(f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING for f in fields.values()):
        return None
    where = f"[{prefix}]" if prefix else "the top level"
    found: list[tuple[str, str, str]] = []
    token = _SINK.set(found)
    obj: T | None = None
    try:
        obj = cls(**kwargs)
    except ValueError as exc:
        found.append(("", str(exc), ""))
    except Exception as exc:  # noqa: BLE001 - any value a recipe can hold must give a ConfigError
        # A check that recorded its problem and went on can trip over the same bad value.
        if not found:
            found.append(("", f"{type(exc).__name__}: {exc}", ""))
    finally:
        _SINK.reset(token)
    for key, message, fix in found:
        field_name = key or message.split(" ", 1)[0].split("=", 1)[0].strip()
        owner = fields.get(field_name)
        full = dotted(field_name) if owner is not None else (prefix or "recipe")
        default_fix = f"set {full} as the message says" if owner is not None else f"change the {where} values it names"
        problem = Problem(full, f"{message} in {where}" if owner is None else message, fix or default_fix)
        problems.append(_with_default(problem, owner) if owner is not None else problem)
    return obj


def collect(cls: type[T], data: Mapping[str, Any], *, source: str = "config", prefix: str = "") -> tuple[T | None, list[Problem]]:
    """Build ``cls`` from ``data`` and every problem found: (object or None, problems).

    With problems, the object (when not None) holds the defaults in place of the bad values:
    good enough for checks across tables, never for a run.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    problems: list[Problem] = []
    obj = _build(cls, data, source, prefix, problems)
    return obj, problems


def from_mapping(cls: type[T], data: Mapping[str, Any], *, source: str = "config", prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; every unknown, mistyped or invalid key is named.

    ``source`` names the file for the message; ``prefix`` is the dotted path of this table.
    All problems are raised together in one ConfigError.
    """
    obj, problems = collect(cls, data, source=source, prefix=prefix)
    if problems or obj is None:
        raise ConfigError.of(source, problems)
    return obj


def to_mapping(obj: Any) -> dict[str, Any]:
    """The plain-dict form of a config dataclass (for recording it in the ledger)."""
    return dataclasses.asdict(obj)


def check(condition: bool, message: str, *, key: str = "", fix: str = "") -> None:
    """Validation helper for ``__post_init__``.

    ``message`` starts with the field's name (or ``key`` names it); ``fix`` says what works.
    While ``from_mapping`` builds a table the problem is recorded and checking goes on, so
    one attempt reports them all; otherwise a ValueError is raised.
    """
    if condition:
        return
    sink = _SINK.get()
    if sink is None:
        raise ValueError(message)
    sink.append((key, message, fix))
