"""JSON texts winback writes and reads back: compact, sorted keys, and their fingerprints.

Kept apart from the planner (no SQLAlchemy here) so the normalising worker process imports only
this and `connector.identity`.
"""

from __future__ import annotations

import hashlib
import json
import json.scanner
from collections.abc import Callable
from typing import Any

import orjson


def _text_encoder(**options: Any) -> Callable[[Any], str]:
    """`json.JSONEncoder(**options).encode` with its per-call set-up done once.

    `encode` builds a new C encoder on every call (~1 us of a ~2 us call for a small dict);
    this one is built once and reused. Same text for every value; the only difference is that
    it does not check for circular references (the values planned come from JSON or the
    warehouse and cannot be circular).
    """
    encoder = json.JSONEncoder(**options)
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None or encoder.indent is not None:
        return encoder.encode
    iterencode = make(
        None,  # markers: no circular-reference check
        encoder.default,
        json.encoder.encode_basestring_ascii
        if encoder.ensure_ascii
        else json.encoder.encode_basestring,
        None,
        encoder.key_separator,
        encoder.item_separator,
        encoder.sort_keys,
        encoder.skipkeys,
        encoder.allow_nan,
    )
    join = "".join

    def encode(value: Any) -> str:
        return join(iterencode(value, 0))

    return encode


def _text_decoder() -> Callable[[str], Any]:
    """`json.loads` for the texts winback wrote, without its per-call Python overhead.

    `json.loads` wraps the C scanner in two regex whitespace skips and a few calls (~2 us of a
    ~3 us call for a small object); this calls the scanner directly and falls back to
    `json.loads` for anything it does not consume exactly (leading or trailing whitespace,
    errors), so every text decodes to the same value and every error is the same.
    """
    make_scanner: Any = json.scanner.make_scanner  # typeshed's signature is not the runtime's
    scan_once = make_scanner(json.JSONDecoder())
    loads = json.loads

    def decode(text: str) -> Any:
        try:
            value, end = scan_once(text, 0)
        except StopIteration:
            return loads(text)
        return value if end == len(text) else loads(text)

    return decode


loads_text = _text_decoder()

# Built once: `json.dumps(value, **same options)` builds a new encoder on every call.
_json_compact_text = _text_encoder(sort_keys=True, separators=(",", ":"), default=str)

_PLAIN = frozenset({str, int, bool, type(None)})
"""Values orjson writes as the json module does (floats differ: 1e16 for 1e+16)."""


def _plain(value: dict[Any, Any]) -> bool:
    """Whether the dict holds only plain values, or dicts of them (a payload, identifiers)."""
    plain = _PLAIN
    for item in value.values():
        kind = type(item)
        if kind is dict:
            for inner in item.values():
                if type(inner) not in plain:
                    return False
        elif kind not in plain:
            return False
    return True


def compact_text(value: Any) -> str:
    """The text that is fingerprinted, staged and planned: compact, sorted keys, non-ASCII
    escaped (`json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)`).

    A dict of plain values is written by orjson (~3x less work for a payload) whenever that
    gives the same text: when it is ASCII without DEL, which json escapes and orjson does not.
    """
    if type(value) is dict and _plain(value):
        try:
            data = orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
        except TypeError:  # an integer beyond 64 bits, a key that is not a string
            pass
        else:
            if data.isascii() and b"\x7f" not in data:
                return data.decode()
    return _json_compact_text(value)


def fingerprinted_text(value: Any) -> tuple[str, str]:
    """(compact JSON text, its SHA-1): the stable fingerprint of a JSON-able value and the text
    the plan and the snapshot keep (read back with `json.loads`: older snapshots hold the same
    value with spaces after separators)."""
    text = compact_text(value)
    return text, hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()
