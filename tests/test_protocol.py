"""The protocol package on its own: pure, no processes. Property tests drive the codec,
the framing and the session machines (SECURITY-REVIEW 2-4 at the unit level)."""

import json

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from broker.protocol_session import BrokerSession
from protocol import canonical
from protocol.errors import ProtocolError
from protocol.framing import FrameReader, encode_frame
from protocol.session import NEED_DATA, HelperSession
from protocol.messages import Exited, Ping, Refused, Signal, Spawn, Spawned, from_wire, to_wire

KEY = bytes(range(32))

usernames = st.from_regex(r"[a-z_][a-z0-9_-]{0,31}", fullmatch=True)
names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,60}", fullmatch=True)
req_ids = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)
text = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=50)
env = st.dictionaries(st.from_regex(r"[A-Z_][A-Z0-9_]{0,20}", fullmatch=True), text, max_size=5)
channels = st.sampled_from([(), ("cred",), ("audit",), ("cred", "audit")])
spawns = st.builds(Spawn, req_ids, usernames, st.integers(0, 2**32 - 1), names, env, st.binary(max_size=300), channels)
requests = st.one_of(
    spawns,
    st.builds(Signal, req_ids, st.integers(1, 2**22), st.sampled_from(["TERM", "INT", "KILL", "HUP"])),
    st.builds(Ping, req_ids),
)
events = st.one_of(
    st.builds(Spawned, req_ids, st.integers(1, 2**22), channels),
    st.builds(Refused, req_ids, st.from_regex(r"[a-z][a-z0-9-]{0,31}", fullmatch=True), text),
    st.builds(Exited, st.integers(1, 2**22), st.integers(-64, 255)),
)


def pair():
    helper, broker = HelperSession(KEY), BrokerSession(KEY)
    broker.receive_data(helper.challenge())
    broker.next_event()
    helper.receive_data(broker.hello())
    helper.next_event()
    return helper, broker


# -- the codec -------------------------------------------------------------------------------

@given(requests)
def test_message_round_trip(msg):
    body = canonical.dumps(to_wire(msg))
    assert from_wire(canonical.loads(body)) == msg


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=20))
def test_canonical_round_trip(obj):
    assert canonical.loads(canonical.dumps(obj)) == obj


@pytest.mark.parametrize("raw,words", [
    (b'{"a":1,"a":2}', "duplicate key"),
    (b'{"a":NaN}', "NaN"),
    (b'{"a":-Infinity}', "-Infinity"),
    (b'{"a":1.5}', "floats"),
    (b'{"a":1e3}', "floats"),
    (b'{"a": 1}', "canonical"),
    (b'{"b":1,"a":2}', "canonical"),
    (b'{"a":"\\u0041"}', "canonical"),
    (b'\xff', "invalid JSON"),
    (b'{"a":"\xed\xa0\x80"}', "invalid JSON"),  # a UTF-8-encoded surrogate
])
def test_canonical_refusals(raw, words):
    with pytest.raises(ProtocolError, match=words.replace("\\", "")):
        canonical.loads(raw)


def spawn_body(**change):
    body = to_wire(Spawn("r1", "alice", 1001, "uep", {}, b"", ()))
    body.update(change)
    return body


@pytest.mark.parametrize("change,words", [
    ({"uid": True}, "expected an integer"),
    ({"uid": "1001"}, "expected an integer"),
    ({"uid": -1}, "outside"),
    ({"uid": 2**32}, "outside"),
    ({"username": "a" * 33}, "longer than"),
    ({"username": "../etc"}, "does not match"),
    ({"username": "-rf"}, "does not match"),
    ({"username": "a\nb"}, "does not match"),
    ({"username": "a..b"}, "contains '..'"),
    ({"name": "a/b"}, "does not match"),
    ({"name": "x\x00"}, "NUL"),
    ({"env": {"LD PRELOAD": "x"}}, "does not match"),
    ({"env": {f"V{i}": "" for i in range(65)}}, "at most 64"),
    ({"env": {"A": "x" * 4097}}, "longer than"),
    ({"stdin": "not base64!"}, "not valid base64"),
    ({"stdin": "QQ"}, "not valid base64"),
    ({"channels": ["audit", "cred"]}, "sorted"),
    ({"channels": ["tty"]}, "subset"),
    ({"extra": 1}, "unexpected keys"),
    ({"type": "nope"}, "unknown message type"),
])
def test_decoder_refusals(change, words):
    with pytest.raises(ProtocolError, match=words):
        from_wire(spawn_body(**change))


def test_missing_key_refused():
    body = spawn_body()
    del body["stdin"]
    with pytest.raises(ProtocolError, match=r"missing keys \['stdin'\]"):
        from_wire(body)


# -- framing ---------------------------------------------------------------------------------

@given(st.lists(st.binary(min_size=1, max_size=200), min_size=1, max_size=10), st.data())
def test_frames_survive_any_split(bodies, data):
    stream = b"".join(encode_frame(b) for b in bodies)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    reader, got = FrameReader(), []
    for a, b in zip([0, *cuts], [*cuts, len(stream)]):
        reader.feed(stream[a:b])
        while (frame := reader.next_frame()) is not None:
            got.append(frame)
    assert got == bodies
    assert not reader.partial
    reader.close()


def test_frame_limits():
    reader = FrameReader(max_body=10)
    with pytest.raises(ProtocolError, match="exceeds the limit of 10"):
        reader.feed(b"\0\0\0\x0b")
    with pytest.raises(ProtocolError, match="zero-length"):
        FrameReader().feed(b"\0\0\0\0")
    reader = FrameReader()
    reader.feed(b"\0\0\0\x05abc")
    with pytest.raises(ProtocolError, match="inside a frame"):
        reader.close()
    with pytest.raises(ProtocolError):
        encode_frame(b"x" * (2**20 + 1))


# -- the session -----------------------------------------------------------------------------

@given(st.lists(requests, min_size=1, max_size=5), st.lists(events, max_size=5))
def test_session_round_trip(reqs, evs):
    helper, broker = pair()
    for msg in reqs:
        helper.receive_data(broker.send(msg))
        assert helper.next_event() == msg
    for ev in evs:
        broker.receive_data(helper.send(ev))
        assert broker.next_event() == ev
    assert helper.next_event() is NEED_DATA


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=3 * settings.default.max_examples)
@given(spawns, st.data())
def test_any_mutation_of_a_signed_frame_is_refused_or_harmless(msg, data):
    """Flip, insert or delete bytes anywhere in a signed frame: the helper either refuses
    it or (never, in practice) decodes exactly the message that was signed."""
    helper, broker = pair()
    frame = bytearray(broker.send(msg))
    kind = data.draw(st.sampled_from(["flip", "insert", "delete"]))
    pos = data.draw(st.integers(0, len(frame) - 1))
    if kind == "flip":
        frame[pos] ^= data.draw(st.integers(1, 255))
    elif kind == "insert":
        frame[pos:pos] = data.draw(st.binary(min_size=1, max_size=4))
    else:
        del frame[pos:pos + data.draw(st.integers(1, 4))]
    try:
        helper.receive_data(bytes(frame))
        helper.receive_data(b"")  # the connection ends after the mutated frame
        event = helper.next_event()
    except ProtocolError:
        return
    assert event == msg, event


def test_session_rules():
    helper, broker = pair()
    ping = broker.send(Ping("p"))
    helper.receive_data(ping)
    assert helper.next_event() == Ping("p")
    helper.receive_data(ping)
    with pytest.raises(ProtocolError, match="replayed or skipped"):
        helper.next_event()
    with pytest.raises(ProtocolError, match="session is error"):
        helper.receive_data(b"")  # an error is final

    helper, broker = pair()
    broker.next_seq = 5
    helper.receive_data(broker.send(Ping("p")))
    with pytest.raises(ProtocolError, match="seq 5, expected 1"):
        helper.next_event()

    helper, broker = pair()
    _, broker2 = pair()
    helper.receive_data(broker2.send(Ping("p")))  # signed for another connection's nonce
    with pytest.raises(ProtocolError, match="bad MAC"):
        helper.next_event()

    helper = HelperSession(KEY)
    helper.challenge()
    helper.receive_data(encode_frame(canonical.dumps({"type": "ping", "req": "p", "seq": 1, "mac": "0" * 64})))
    with pytest.raises(ProtocolError, match="expected hello"):
        helper.next_event()


def test_broker_resume_continues_the_session():
    helper, broker = pair()
    helper.receive_data(broker.send(Ping("a")))
    helper.next_event()
    state = json.loads(json.dumps(broker.export()))  # what a re-exec'd broker gets
    resumed = BrokerSession.resume(KEY, **state)
    helper.receive_data(resumed.send(Ping("b")))
    assert helper.next_event() == Ping("b")


def test_broker_resume_keeps_a_half_arrived_event():
    """The helper may be writing an `exited` event at the moment of a SIGHUP re-exec."""
    helper, broker = pair()
    frame = helper.send(Exited(4242, 0)) + helper.send(Exited(4243, 9))
    cut = len(frame) - 7
    broker.receive_data(frame[:cut])
    assert broker.next_event() == Exited(4242, 0)
    assert broker.next_event() is NEED_DATA
    resumed = BrokerSession.resume(KEY, **json.loads(json.dumps(broker.export())))
    resumed.receive_data(frame[cut:])
    assert resumed.next_event() == Exited(4243, 9)
    helper.receive_data(resumed.send(Ping("c")))
    assert helper.next_event() == Ping("c")


def test_helper_sends_only_events():
    helper, broker = pair()
    with pytest.raises(ProtocolError):
        helper.send(Ping("x"))
    with pytest.raises(ProtocolError):
        broker.send(Exited(1, 0))


def test_messages_are_immutable_and_equal_only_to_their_own_type():
    from protocol.messages import Pong
    assert Ping("a") == Ping("a") and hash(Ping("a")) == hash(Ping("a"))
    assert Ping("a") != Pong("a") and not Ping("a") == Pong("a") and Ping("a") != ("a",)
    with pytest.raises(AttributeError):
        Ping("a").req = "b"

