"""The JSON number normalisation every written document goes through (``db._js_numbers``)."""

from __future__ import annotations

import enum
from collections import OrderedDict
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from gatefill.db import _js_numbers, canonical_json, dumps_json


def _reference(value: object) -> object:
    # The rule as the platform states it, written the plain way: integral floats below 1e21 print as integers.
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e21:
        return int(value)
    if isinstance(value, dict):
        return {k: _reference(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_reference(v) for v in value]
    return value


class Colour(enum.IntEnum):
    RED = 1


class Mode(enum.StrEnum):
    FAST = "fast"


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.sampled_from([90.0, -0.0, 1e21, 1e20, 2.5, 1e300, -7.0]),
    st.text(max_size=5),
    st.sampled_from([Colour.RED, Mode.FAST]),
)
documents = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=4).map(tuple),
        st.dictionaries(st.text(max_size=4), inner, max_size=4),
        st.dictionaries(st.text(max_size=4), inner, max_size=4).map(OrderedDict),
    ),
    max_leaves=25,
)


def _typed(value: Any) -> Any:
    """The value with the type of every node, so 1 and 1.0 (equal in Python) are told apart."""
    if isinstance(value, dict):
        return (type(value).__name__, {k: _typed(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return (type(value).__name__, [_typed(v) for v in value])
    return (type(value).__name__, value)


@given(documents)
def test_js_numbers_equals_the_plain_rule_node_for_node(document: object) -> None:
    assert _typed(_js_numbers(document)) == _typed(_reference(document))


def test_integral_floats_print_as_javascript_prints_them() -> None:
    doc = {"a": 90.0, "b": [1.0, 2.5, {"c": -3.0}], "d": (4.0,), "big": 1e21, "e": True, "f": None}
    assert dumps_json(doc) == '{"a":90,"b":[1,2.5,{"c":-3}],"d":[4],"big":1e+21,"e":true,"f":null}'
    assert canonical_json({"z": 1.0, "a": 0.5}) == '{"a":0.5,"z":1}'
    original = {"a": [90.0]}
    _js_numbers(original)
    assert original == {"a": [90.0]} and type(original["a"][0]) is float  # the input is never changed
