"""Start-UEP commands from the Globus Compute service, parsed and checked (no I/O).

The format is upstream's (globus-compute-endpoint 4.19, core_endpoint.py): an AMQP
message with content type application/json and a timestamp, whose body is

    {"command": "cmd_start_endpoint", "args": [...],
     "kwargs": {"name": UEP id, "amqp_creds": {...}, "user_opts": {...}, "user_runtime": {...}},
     "globus_effective_identity": ..., "globus_identity_set": [...], "globus_username": ...}
"""

from __future__ import annotations

import json
import re
import time

import attrs

from broker.refusal import Refused

MAX_DEPTH = 100  # lists and objects in a command nest at most this deep
MAX_SKEW_S = 180  # upstream's: older (or further in the future) commands are refused
START_COMMAND = "cmd_start_endpoint"
UEP_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # the helper's rule, checked early


@attrs.frozen
class StartCommand:
    name: str
    amqp_creds: dict
    user_opts: dict
    user_runtime: dict
    args: list
    effective_identity: str
    identity_set: list
    globus_username: str
    kwargs: dict  # as received, for failure notices and replays
    timestamp: int

    @property
    def endpoint_id(self) -> str:
        return str(self.amqp_creds.get("endpoint_id", self.name))

    def for_log(self) -> dict:
        return {"uep": self.name, "identity": self.effective_identity, "globus_username": self.globus_username}


def depth(obj) -> int:
    """How deeply lists and objects nest in `obj` (a scalar is 0), without recursion."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        value, level = stack.pop()
        if isinstance(value, (dict, list)):
            deepest = max(deepest, level)
            stack.extend((v, level + 1) for v in (value.values() if isinstance(value, dict) else value))
    return deepest


def shallow(text: str, max_depth: int) -> str:
    """JSON text with every list or object deeper than `max_depth` replaced by null, so
    that a body too deep to parse still yields the credentials its failure notice needs."""
    out, level, cut, in_string, escaped = [], 0, None, False, False
    for c in text:
        if in_string:
            in_string, escaped = (escaped or c != '"'), (not escaped and c == "\\")
        elif c == '"':
            in_string = True
        elif c in "[{":
            level += 1
            if level > max_depth and cut is None:
                cut = level
                out.append("null")
        elif c in "]}":
            level -= 1
            if cut is not None and level < cut:
                cut = None
                continue
        if cut is None:
            out.append(c)
    return "".join(out)


def parse(body: bytes, content_type: str | None, timestamp, now: float | None = None) -> StartCommand:
    """The intake's check of one AMQP message: a StartCommand, or Refused (with the kwargs
    a failure notice needs, when the body got that far)."""
    if content_type != "application/json":
        raise Refused("Invalid message type; expecting JSON",
                      f"Invalid message type; expecting JSON (content type {content_type!r})")
    too_deep = False
    try:
        try:
            msg = json.loads(body)
        except RecursionError:  # deeper than the parser's stack: read what is shallow, for the notice
            msg, too_deep = json.loads(shallow(body.decode("utf-8"), MAX_DEPTH)), True
        if not isinstance(msg, dict):
            raise ValueError("the body is not a JSON object")
        kwargs = msg.get("kwargs", {})
    except (ValueError, RecursionError) as e:
        raise Refused(f"Unable to deserialize Globus Compute services command. ({type(e).__name__}) {e}") from None
    if too_deep or depth(msg) > MAX_DEPTH:  # templates, schemas and YAML recurse over user_opts
        raise Refused(f"Invalid server command: nested more than {MAX_DEPTH} levels deep (user_opts or "
                      "user_runtime?)", kwargs=kwargs)
    now = round(time.time() if now is None else now)
    try:
        ts = int(timestamp)
    except (TypeError, ValueError):
        raise Refused("Invalid server command: no timestamp", kwargs=kwargs) from None
    if abs(now - ts) > MAX_SKEW_S:
        raise Refused("Ignoring command from server\nCommand too old or skew between system clocks is too "
                      f"large.\n  Command timestamp:  {ts}\n  Endpoint timestamp: {now}", kwargs=kwargs)
    if not isinstance(kwargs, dict):
        raise Refused("Invalid server command: kwargs is not an object")
    command = msg.get("command")
    if command != START_COMMAND:
        raise Refused(f"Unknown or invalid command: {str(command)[:80]}", kwargs=kwargs)
    missing = [k for k in ("globus_effective_identity", "globus_identity_set", "globus_username") if k not in msg]
    if missing:
        raise Refused(f"Invalid server command.  (KeyError) {missing[0]!r}", kwargs=kwargs)
    identity_set = msg["globus_identity_set"]
    if not isinstance(identity_set, list) or not all(isinstance(i, dict) for i in identity_set):
        raise Refused("Invalid server command: globus_identity_set is not a list of identities", kwargs=kwargs)
    name = kwargs.get("name")
    if not isinstance(name, str) or not UEP_NAME_RE.fullmatch(name) or ".." in name:
        raise Refused("Missing or invalid endpoint name", kwargs=kwargs)
    creds = kwargs.get("amqp_creds")
    if not isinstance(creds, dict) or not isinstance(creds.get("heartbeat_queue_info"), dict):
        raise Refused("Invalid server command: amqp_creds missing or malformed", kwargs=kwargs)
    user_opts, user_runtime, args = kwargs.get("user_opts") or {}, kwargs.get("user_runtime") or {}, msg.get("args") or []
    if not isinstance(args, list):
        raise Refused("Invalid server command: args is not a list", kwargs=kwargs)
    return StartCommand(name=name, amqp_creds=creds, user_opts=user_opts, user_runtime=user_runtime, args=args,
                        effective_identity=str(msg["globus_effective_identity"]), identity_set=identity_set,
                        globus_username=str(msg["globus_username"]), kwargs=kwargs, timestamp=ts)
