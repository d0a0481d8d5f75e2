"""Canonical JSON: property tests (round trip, determinism, key order) and refusals."""

from __future__ import annotations

import json
import random
from enum import IntEnum

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from registry.canonical import CanonicalJSONError, canonical_json

scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text()
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=25,
)


def _shuffled(value, rng):
    """The same value with every dict's insertion order shuffled."""
    if isinstance(value, dict):
        items = list(value.items())
        rng.shuffle(items)
        return {k: _shuffled(v, rng) for k, v in items}
    if isinstance(value, list):
        return [_shuffled(v, rng) for v in value]
    return value


@settings(max_examples=150, deadline=None)
@given(json_values)
def test_round_trip(value):
    assert json.loads(canonical_json(value)) == value


@settings(max_examples=150, deadline=None)
@given(json_values, st.randoms(use_true_random=False))
def test_deterministic_and_key_order_independent(value, rng):
    encoded = canonical_json(value)
    assert canonical_json(value) == encoded
    assert canonical_json(_shuffled(value, rng)) == encoded
    # Re-encoding the decoded bytes is a fixed point.
    assert canonical_json(json.loads(encoded)) == encoded


@settings(max_examples=100, deadline=None)
@given(st.integers())
def test_ints_stay_ints(n):
    assert canonical_json(n) == str(n).encode()
    assert type(json.loads(canonical_json({"n": n}))["n"]) is int


def test_exact_form():
    assert canonical_json({"b": [1, 2.5, None], "a": "é", "c": True}) == ('{"a":"é","b":[1,2.5,null],"c":true}'.encode())


@pytest.mark.parametrize(
    "bad",
    [
        float("nan"),
        float("inf"),
        -float("inf"),
        {"x": [float("nan")]},
        (1, 2),
        {1: "a"},
        {"s": {1, 2}},
        b"bytes",
        IntEnum("E", "A").A,
        "\ud800",
        {"k": object()},
    ],
)
def test_non_json_values_are_refused(bad):
    with pytest.raises(CanonicalJSONError):
        canonical_json(bad)


def test_error_names_where():
    with pytest.raises(CanonicalJSONError, match=r"\$\.data\.loss"):
        canonical_json({"data": {"loss": float("nan")}})


def test_key_order_example():
    rng = random.Random(0)
    value = {str(i): i for i in range(20)}
    assert canonical_json(_shuffled(value, rng)) == canonical_json(value)
