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


plain_values = st.none() | st.booleans() | st.integers() | st.text(alphabet=st.characters())
ascii_texts = st.text(alphabet=st.characters(max_codepoint=127))
payloads = st.dictionaries(  # what the planner fingerprints: payloads, identifiers, fields
    ascii_texts | st.text(max_size=4),
    plain_values | ascii_texts | st.dictionaries(ascii_texts, plain_values | ascii_texts),
    max_size=5,
)


@settings(max_examples=500, deadline=None)
@given(payloads)
def test_compact_text_of_a_payload_is_json_dumps_with_sorted_keys(value: Any) -> None:
    """Mostly through orjson: ASCII control characters, DEL, big integers, non-ASCII keys."""
    expected = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    assert _COMPACT(value) == expected


def test_compact_text_escapes_as_json_does() -> None:
    for value in ({"k": "\x7f"}, {"k": {"n": 2**64}}, {"é": 1}, {"k": '\x00\n"\\'}, {1: "a"}):
        expected = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
        assert _COMPACT(value) == expected


sent_values = st.recursive(  # what json_value returns: no NaN or infinity
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text().filter(lambda text: not any("\ud800" <= c <= "\udfff" for c in text)),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(sent_values)
def test_json_bytes_is_json_dumps_in_utf8(value: Any) -> None:
    from destinations.base import json_bytes

    expected = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    sent = json_bytes(value)
    assert json.loads(sent) == json.loads(expected)
    if not _has_float(value):  # floats may be written 1e16 instead of 1e+16: the same number
        assert sent == expected.encode()


def _has_float(value: Any) -> bool:
    if isinstance(value, float):
        return True
    if isinstance(value, dict):
        return any(_has_float(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_float(v) for v in value)
    return False


def test_json_bytes_falls_back_to_json_for_what_orjson_refuses() -> None:
    from destinations.base import json_bytes

    assert json_bytes({"n": 2**70}) == b'{"n":1180591620717411303424}'
    assert json_bytes({1: "a"}) == b'{"1":"a"}'


def test_json_bytes_renders_what_json_lacks_as_json_value_does() -> None:
    import datetime
    import decimal
    import uuid
    from types import MappingProxyType

    from destinations.base import json_bytes, json_value

    document = {
        "date": datetime.date(2026, 12, 7),
        "at": datetime.datetime(2026, 12, 7, 2, 45, 59, 123456),
        "aware": datetime.datetime(2026, 12, 7, tzinfo=datetime.UTC),
        "time": datetime.time(8, 30),
        "price": decimal.Decimal("12.50"),
        "count": decimal.Decimal("3"),
        "nan": float("nan"),
        "inf": float("-inf"),
        "raw": b"\x01\xff",
        "tags": ("a", "b"),
        "set": frozenset({"x"}),
        "id": uuid.UUID(int=7),
        "gap": datetime.timedelta(days=1),
        "nested": {"when": datetime.date(2026, 1, 1)},
        "proxy": MappingProxyType({"k": "v"}),
    }
    expected = json.dumps(json_value(document), ensure_ascii=False, separators=(",", ":"))
    assert json_bytes(document) == expected.encode()
