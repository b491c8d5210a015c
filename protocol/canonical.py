"""Canonical JSON (sorted keys, no whitespace, no floats). A body is accepted only if it
re-encodes to the same bytes: no ambiguity left, so the MAC over it is unambiguous too."""

import json

from protocol.errors import ProtocolError


def dumps(obj) -> bytes:
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
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
        obj = json.loads(body.decode("utf-8"), object_pairs_hook=_pairs, parse_constant=_no_constant, parse_float=_no_float)
    except ProtocolError:
        raise
    except (ValueError, UnicodeError, RecursionError) as e:
        raise ProtocolError(f"invalid JSON: {e}") from None
    if dumps(obj) != body:
        raise ProtocolError("body is not in canonical form")
    return obj
