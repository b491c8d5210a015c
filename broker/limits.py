"""The helper's limits, checked where each value enters the broker.

The limits themselves are defined once, in protocol/messages.py; the helper's decoder
enforces them and treats a request that breaks one as a protocol violation, fatal to
the connection (and so to every user's UEP). The broker therefore checks each value
against the same definitions as soon as it has it, and names it the way the user or the
administrator knows it ("user_runtime.globus_compute_sdk_version is longer than 4096
characters"); the session's own check of the whole request (broker/protocol_session.py) is the
backstop for whatever this module does not name.
"""

from __future__ import annotations

from broker.refusal import Refused
from protocol.errors import ProtocolError
from protocol.messages import ENV_NAME, ENV_VALUE, MAX_ENV_VARS, MAX_STDIN, USERNAME


class LimitBroken(Refused):
    """A value over one of the helper's limits: one sentence that names the value and the
    limit, for the user and the log alike."""


def _check(checker, label: str, value: str) -> str:
    try:
        checker.check(label, value)
        value.encode("utf-8")  # what canonical JSON will do with it
    except ProtocolError as e:
        raise LimitBroken(str(e)) from None
    except UnicodeError:
        raise LimitBroken(f"{label} is not valid text (it holds a lone surrogate)") from None
    return value


def env_value(label: str, value: str) -> str:
    return _check(ENV_VALUE, label, value)


def env_name(label: str, value: str) -> str:
    return _check(ENV_NAME, label, value)


def username(value: str) -> str:
    return _check(USERNAME, "the local user name", value)


def environment(env: dict, where: str) -> dict:
    """An environment for a UEP: at most MAX_ENV_VARS names of the protocol's form and values."""
    if len(env) > MAX_ENV_VARS:
        raise LimitBroken(f"{where} sets {len(env)} variables, more than the limit of {MAX_ENV_VARS}")
    for name, value in env.items():
        env_name(f"{where}: the variable name", name)
        env_value(f"{where}: {name}", value)
    return env


def stdin_size(document: bytes, what: str) -> bytes:
    if len(document) > MAX_STDIN:
        raise LimitBroken(f"{what} is {len(document)} bytes, more than the limit of {MAX_STDIN} bytes")
    return document
