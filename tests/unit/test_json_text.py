"""The planner's JSON helpers give exactly what the json module gives."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from connector.json_text import compact_text as _COMPACT
from connector.json_text import loads_text as _LOADS

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=500, deadline=None)
@given(json_values, st.sampled_from(["", " ", "\n"]), st.sampled_from(["", " ", "\t"]))
def test_decoding_gives_what_json_loads_gives(value: Any, before: str, after: str) -> None:
    for text in (_COMPACT(value), json.dumps(value), before + json.dumps(value) + after):
        assert _LOADS(text) == json.loads(text)


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=30))
def test_decoding_fails_where_json_loads_fails(text: str) -> None:
    try:
        expected: Any = json.loads(text)
    except json.JSONDecodeError as error:
        try:
            _LOADS(text)
        except json.JSONDecodeError as ours:
            assert str(ours) == str(error)
        else:
            raise AssertionError(f"{text!r} decoded") from None
    else:
        assert json.dumps(_LOADS(text)) == json.dumps(expected)  # NaN is not equal to itself


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_compact_text_is_json_dumps_with_sorted_keys(value: Any) -> None:
    expected = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    assert _COMPACT(value) == expected
