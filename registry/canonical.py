"""Canonical JSON: one byte string per value, so that hashes and signatures over it are stable.

Sorted keys, no whitespace, UTF-8 (not \\u-escaped), ints as ints, finite floats in
Python's shortest round-trip form. Only JSON's own types are accepted — dict with str keys,
list, str, int, float, bool, None — and exactly those types (no tuples, no subclasses such
as IntEnum), so that ``json.loads(canonical_json(x)) == x`` holds for every accepted value.
"""

from __future__ import annotations

import json
import math

from keys.errors import ApplianceError


class CanonicalJSONError(ApplianceError, ValueError):
    """A value cannot be encoded as canonical JSON (NaN, a tuple, a non-str key, …)."""


def _check(value: object, where: str) -> None:
    # ``type(x) is T``, not isinstance: subclasses (IntEnum, a str subclass) are refused
    # because json would encode them in ways that do not round-trip. mypy narrows on it too.
    if value is None or type(value) is bool or type(value) is int:
        return
    if type(value) is str:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise CanonicalJSONError(
                f"{where}: string holds a lone surrogate and is not valid UTF-8",
                "decode the text with errors='replace' before recording it",
            ) from None
        return
    if type(value) is float:
        if not math.isfinite(value):
            raise CanonicalJSONError(
                f"{where}: {value!r} is not allowed in canonical JSON",
                "record non-finite numbers as null or as a string",
            )
        return
    if type(value) is list:
        for i, item in enumerate(value):
            _check(item, f"{where}[{i}]")
        return
    if type(value) is dict:
        for key, item in value.items():
            if type(key) is not str:
                raise CanonicalJSONError(
                    f"{where}: key {key!r} is a {type(key).__name__}, not a str",
                    "convert mapping keys to strings before recording",
                )
            _check(key, f"{where} key")
            _check(item, f"{where}.{key}")
        return
    raise CanonicalJSONError(
        f"{where}: a {type(value).__name__} is not a JSON type",
        "convert it to dict, list, str, int, float, bool or None (tuples to lists, paths to str, enums to their value)",
    )


def canonical_json(obj: object) -> bytes:
    """The canonical UTF-8 JSON encoding of ``obj``; raise CanonicalJSONError if it has none."""
    _check(obj, "$")
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")
