"""The helper protocol's limits, checked by the broker before a request leaves it (issue 15):
pure logic, at, just under and just over each limit."""

from __future__ import annotations

import base64
import json
import os
import time

import pytest

from broker import commands, limits
from broker.refusal import Refused
from broker.journal import MAX_BEGUN, Journal
from broker.protocol_session import BrokerSession, InvalidRequest
from protocol.errors import ProtocolError
from protocol.framing import MAX_FRAME
from protocol.messages import MAX_ENV_VALUE, MAX_ENV_VARS, MAX_STDIN, Base64, Challenge, Ping, Spawn
from protocol.session import HelperSession

KEY = os.urandom(32)


def ready_pair(max_frame=MAX_FRAME):
    helper, broker = HelperSession(KEY, max_frame), BrokerSession(KEY)
    broker.receive_data(helper.challenge())
    assert isinstance(broker.next_event(), Challenge)
    helper.receive_data(broker.hello())
    helper.next_event()
    return helper, broker


@pytest.mark.parametrize("size, ok", [(MAX_STDIN - 1, True), (MAX_STDIN, True), (MAX_STDIN + 1, False),
                                      (MAX_STDIN + 2, False)])
def test_the_stdin_cap_counts_decoded_bytes(size, ok):
    text = base64.b64encode(b"s" * size).decode()
    if ok:
        assert len(Base64(MAX_STDIN).check("stdin", text)) == size
    else:
        with pytest.raises(ProtocolError, match=f"is {size} bytes, more than {MAX_STDIN}|is longer than"):
            Base64(MAX_STDIN).check("stdin", text)


def spawn(env=None, stdin=b"", name="uep"):
    return Spawn("r1", "alice", 1000, name, env or {}, stdin, ())


@pytest.mark.parametrize("request_, words", [
    (spawn(env={"V": "v" * (MAX_ENV_VALUE + 1)}), f"is longer than {MAX_ENV_VALUE} characters"),
    (spawn(env={"MY-VAR": "1"}), "does not match"),
    (spawn(env={f"V{i}": "" for i in range(MAX_ENV_VARS + 1)}), f"at most {MAX_ENV_VARS} variables"),
    (spawn(env={"V": "\ud800"}), "cannot encode canonically"),
    (spawn(stdin=b"x" * (MAX_STDIN + 1)), "more than"),
    (spawn(env={f"C{i}": "\x01" * MAX_ENV_VALUE for i in range(50)}), "outside 1..1048576"),
    (Spawn("r1", "alice@corp", 1000, "uep", {}, b"", ()), "does not match"),
])
def test_a_request_over_a_limit_is_refused_before_it_takes_a_sequence_number(request_, words):
    helper, broker = ready_pair()
    with pytest.raises(InvalidRequest, match=words):
        broker.send(request_)
    assert broker.next_seq == 1 and broker.state == "ready"
    helper.receive_data(broker.send(Ping("r2")))  # the next request still carries seq 1: the helper takes it
    assert helper.next_event() == Ping("r2")


def test_at_the_limits_a_request_goes_through():
    helper, broker = ready_pair()
    at = spawn(env={f"V{i}": "v" * MAX_ENV_VALUE for i in range(MAX_ENV_VARS)}, stdin=b"s" * MAX_STDIN, name="n" * 128)
    helper.receive_data(broker.send(at))
    assert helper.next_event() == at


def test_the_broker_keeps_to_the_frame_cap_the_helper_announces():
    helper, broker = ready_pair(max_frame=4096)
    assert broker.send_limit == 4096
    small = spawn(stdin=b"s" * 1000)
    frame = broker.send(small)
    assert len(frame) - 4 <= 4096
    helper.receive_data(frame)
    assert helper.next_event() == small
    with pytest.raises(InvalidRequest, match="outside 1..4096"):
        broker.send(spawn(stdin=b"s" * 4000))
    state = broker.export()
    assert BrokerSession.resume(KEY, **state).send_limit == 4096  # a re-exec'd image keeps it


def test_limits_name_the_value_as_the_user_knows_it():
    label = "user_runtime.globus_compute_sdk_version"
    assert limits.env_value(label, "x" * MAX_ENV_VALUE)
    with pytest.raises(limits.LimitBroken, match=f"^{label} is longer than {MAX_ENV_VALUE} characters$"):
        limits.env_value(label, "x" * (MAX_ENV_VALUE + 1))
    with pytest.raises(limits.LimitBroken, match="contains NUL"):
        limits.env_value(label, "3.11\x00")
    with pytest.raises(limits.LimitBroken, match="lone surrogate"):
        limits.env_value(label, "\udc80")
    with pytest.raises(limits.LimitBroken, match="the local user name 'alice@corp' does not match"):
        limits.username("alice@corp")
    assert limits.username("a" * 32)
    with pytest.raises(limits.LimitBroken, match="longer than 32"):
        limits.username("a" * 33)
    env = {f"V{i}": "1" for i in range(MAX_ENV_VARS)}
    assert limits.environment(env, "user_environment.yaml") == env
    with pytest.raises(limits.LimitBroken, match=f"sets {MAX_ENV_VARS + 1} variables, more than the limit"):
        limits.environment({**env, "X": "1"}, "user_environment.yaml")
    assert limits.stdin_size(b"x" * MAX_STDIN, "it")
    with pytest.raises(limits.LimitBroken, match=f"it is {MAX_STDIN + 1} bytes, more than the limit of {MAX_STDIN}"):
        limits.stdin_size(b"x" * (MAX_STDIN + 1), "it")


def body_nested(levels: int) -> bytes:
    """A start command whose lists and objects nest `levels` deep in all (body, kwargs, user_opts: 3)."""
    inner = "[" * (levels - 3) + "]" * (levels - 3)
    return ('{"command": "cmd_start_endpoint", "kwargs": {"name": "u1", "amqp_creds": {"x": 1}, '
            f'"user_opts": {{"d": {inner}}}}}}}').encode()


@pytest.mark.parametrize("levels", [commands.MAX_DEPTH - 1, commands.MAX_DEPTH])
def test_nesting_up_to_the_limit_is_read(levels):
    assert commands.depth(json.loads(body_nested(levels))) == levels
    with pytest.raises(Refused) as refused:  # no timestamp: refused after the depth check
        commands.parse(body_nested(levels), "application/json", None)
    assert "no timestamp" in str(refused.value)


@pytest.mark.parametrize("levels", [commands.MAX_DEPTH + 1, 5000, 100_000])
def test_deeper_nesting_is_refused_with_the_credentials_for_a_notice(levels):
    with pytest.raises(Refused, match="nested more than 100 levels deep") as refused:
        commands.parse(body_nested(levels), "application/json", time.time())
    assert refused.value.kwargs["amqp_creds"] == {"x": 1}


def test_shallow_cuts_only_outside_strings():
    text = '{"a": "[[{\\"]]", "b": [[[1, [2]]], 3], "c": {"d": {"e": 4}}}'
    assert json.loads(commands.shallow(text, 2)) == {"a": '[[{"]]', "b": [None, 3], "c": {"d": None}}
    assert json.loads(commands.shallow(text, 10)) == json.loads(text)


def test_the_journal_counts_interrupted_handlings_on_disk(tmp_path):
    path = tmp_path / "inflight.json"

    class Log:
        def __init__(self):
            self.lines = []

        def error(self, *args, **kw):
            self.lines.append((args, kw))
    log = Log()
    journal = Journal(path, log)
    journal.begin("a")
    journal.begin("b")
    journal.end("b")
    assert Journal(path, log).interrupted("a") == 1 and Journal(path, log).interrupted("b") == 0
    again = Journal(path, log)
    again.begin("a")
    assert Journal(path, log).interrupted("a") == MAX_BEGUN
    old = json.loads(path.read_text())
    old["a"][1] -= 7200  # begun two hours ago: forgotten
    path.write_text(json.dumps(old))
    assert Journal(path, log).interrupted("a") == 0
    path.write_text("{not json")
    assert Journal(path, log).interrupted("a") == 0 and "unreadable" in log.lines[-1][0][0]
