"""Canonical JSON: UTF-8, sorted keys, no whitespace, no floats, no NaN/Infinity.

The decoder accepts a body only if re-encoding it gives back the same bytes. That one
rule removes every ambiguity (duplicate keys, escapes, spacing, number spellings) and
makes the MAC, which is computed over the canonical bytes, unambiguous too.
"""

import json

from protocol.errors import ProtocolError


def dumps(obj) -> bytes:
    try:
        text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        return text.encode("utf-8")
    except (ValueError, TypeError, UnicodeError, RecursionError) as e:
        raise ProtocolError(f"cannot encode canonically: {e}") from None


def _pairs(pairs):
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise ProtocolError(f"duplicate key {key!r}")
        obj[key] = value
    return obj


def _no_constant(name):
    raise ProtocolError(f"{name} is not allowed")


def _no_float(text):
    raise ProtocolError(f"floats are not allowed ({text[:20]!r})")


def loads(body: bytes):
    try:
        text = body.decode("utf-8")
        obj = json.loads(text, object_pairs_hook=_pairs, parse_constant=_no_constant, parse_float=_no_float)
    except ProtocolError:
        raise
    except (ValueError, UnicodeError, RecursionError) as e:
        raise ProtocolError(f"invalid JSON: {e}") from None
    if dumps(obj) != body:
        raise ProtocolError("body is not in canonical form")
    return obj
