"""The protocol's rules at their exact edges: each limit at, just under and just over its
value, each character class at its first and later positions, each session rule in each
state. Deterministic (no property tests): bench/mutate.py runs this file first, and the
mutation run (docs/mutation.md) found each of these cases untested before."""

import json

import pytest

from broker.protocol_session import BrokerSession
from protocol import canonical
from protocol.errors import ProtocolError
from protocol.framing import FrameReader, encode_frame
from protocol.session import NEED_DATA, HelperSession
from protocol.messages import Exited, Ping, Refused, Signal, Spawn, Spawned, from_wire, to_wire

from tests.test_protocol import KEY, pair, spawn_body


# -- the codec ---------------------------------------------------------------------------------------

def test_canonical_bytes_are_utf8_and_refuse_what_json_cannot_say():
    assert canonical.dumps({"b": "é", "a": [1, None, True]}) == '{"a":[1,null,true],"b":"é"}'.encode()
    assert canonical.loads('{"a":"é"}'.encode()) == {"a": "é"}  # raw UTF-8 is the canonical form, not \u00e9
    for bad in ({"a": float("nan")}, {"a": float("inf")}, {"a": object()}, {"a": b"x"}):
        with pytest.raises(ProtocolError, match="cannot encode canonically"):
            canonical.dumps(bad)
    deep = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(ProtocolError):
        canonical.dumps(deep)


def test_frame_bytes_and_edges():
    assert encode_frame(b"abc") == b"\0\0\0\x03abc"  # u32 big-endian length
    assert encode_frame(b"x" * 10, max_body=10)[:4] == b"\0\0\0\x0a"
    for body, limit in ((b"", 10), (b"x" * 11, 10)):
        with pytest.raises(ProtocolError, match="outside 1..10"):
            encode_frame(body, max_body=limit)
    assert len(encode_frame(b"x" * 2**20)) == 2**20 + 4  # the protocol's ceiling, exactly
    with pytest.raises(ProtocolError, match=f"outside 1..{2**20}"):
        encode_frame(b"x" * (2**20 + 1))
    for bad in (0, -1, 2**20 + 1):
        with pytest.raises(ValueError, match="max_body must be in 1..1048576"):
            FrameReader(max_body=bad)
    assert FrameReader(max_body=1).max_body == 1 and FrameReader(max_body=2**20).max_body == 2**20
    assert FrameReader().max_body == 2**20


def test_frame_reader_at_the_limit_and_partial():
    reader = FrameReader(max_body=10)
    assert reader.partial is False
    reader.feed(b"\0\0")
    assert reader.partial is True and reader.next_frame() is None
    reader.feed(b"\0\x0a" + b"x" * 9)  # a header of exactly the limit is accepted
    assert reader.next_frame() is None and reader.partial is True
    reader.feed(b"y")
    assert reader.next_frame() == b"x" * 9 + b"y"
    assert reader.partial is False and reader.next_frame() is None
    reader.close()
    big = FrameReader()
    big.feed(b"\0\x10\0\0")  # exactly 1 MiB announced: allowed
    with pytest.raises(ProtocolError, match="exceeds the limit of 1048576"):
        FrameReader().feed(b"\0\x10\0\x01")


def test_a_bad_header_behind_a_good_frame_is_refused_when_it_is_reached():
    reader = FrameReader(max_body=10)
    reader.feed(b"\0\0\0\x01a" + b"\0\0\0\x0b")  # the second header announces 11 bytes
    with pytest.raises(ProtocolError, match="exceeds the limit of 10"):
        reader.next_frame()
    reader = FrameReader()
    reader.feed(b"\0\0\0\x01a" + b"\0\0\0\0")
    with pytest.raises(ProtocolError, match="zero-length"):
        reader.next_frame()


def _refused_field(change, words, build=spawn_body):
    with pytest.raises(ProtocolError, match=words):
        from_wire(build(**change))


def _accepted_field(change, build=spawn_body):
    return from_wire(build(**change))


@pytest.mark.parametrize("username", ["a", "_", "A" * 32, "a-b.c_D9", "Z" + "9" * 31])
def test_usernames_the_rule_accepts(username):
    assert _accepted_field({"username": username}).username == username


@pytest.mark.parametrize("username", ["/a", "/", ".a", "-a", "9a", "a/", "a/b", "a" * 33, "a b", "é", "a:b", "a..", ""])
def test_usernames_the_rule_refuses(username):
    _refused_field({"username": username}, "spawn.username")


@pytest.mark.parametrize("name", ["a", "9", "A" * 128, "a.b-c_d", "x..y"[:2]])
def test_uep_names_the_rule_accepts(name):
    assert _accepted_field({"name": name}).name == name


@pytest.mark.parametrize("name,words", [("/a", "does not match"), ("a/b", "does not match"), ("a/", "does not match"),
                                        (".a", "does not match"), ("_a", "does not match"), ("-a", "does not match"),
                                        ("a" * 129, "longer than 128"), ("a..b", "contains '..'"), ("", "does not match"),
                                        ("a\x00", "contains NUL"), (5, "expected a string, got int")])
def test_uep_names_the_rule_refuses(name, words):
    _refused_field({"name": name}, words)


@pytest.mark.parametrize("uid", [0, 1, 1000, 2**32 - 2, 2**32 - 1])
def test_uids_the_decoder_passes_to_authorize(uid):
    assert _accepted_field({"uid": uid}).uid == uid


@pytest.mark.parametrize("uid", [-1, 2**32, 2**32 + 1, True, False, None, "0"])
def test_uids_the_decoder_refuses(uid):
    _refused_field({"uid": uid}, "spawn.uid")


def test_environment_limits_at_their_edges():
    ok = {f"V{i}": "" for i in range(64)}
    assert len(_accepted_field({"env": ok}).env) == 64
    _refused_field({"env": {**ok, "V64": ""}}, "at most 64 variables")
    assert _accepted_field({"env": {"A": "x" * 4096}}).env["A"] == "x" * 4096
    _refused_field({"env": {"A": "x" * 4097}}, r"spawn.env\[A\] is longer than 4096")
    name = "A" * 64
    assert name in _accepted_field({"env": {name: "v"}}).env
    _refused_field({"env": {"A" * 65: "v"}}, "spawn.env key is longer than 64")
    for key in ("_", "a", "A_1", "_9"):
        assert key in _accepted_field({"env": {key: "v"}}).env
    for key in ("1A", "/A", "A/", "A-B", "A.B", "", "A\x00"):
        _refused_field({"env": {key: "v"}}, "spawn.env key")
    _refused_field({"env": {"A": "a\x00b"}}, r"spawn.env\[A\] contains NUL")
    assert _accepted_field({"env": {"A": "../x/..", "B": "é\n"}}).env == {"A": "../x/..", "B": "é\n"}  # values are free text
    _refused_field({"env": {"A": 1}}, "expected a string, got int")
    for not_an_object in ([], [["A", "b"]], "A=b", None):
        _refused_field({"env": not_an_object}, "expected an object")


def test_environment_is_read_only():
    msg = _accepted_field({"env": {"A": "b"}})
    with pytest.raises(TypeError):
        msg.env["A"] = "c"
    assert to_wire(msg)["env"] == {"A": "b"} and type(to_wire(msg)["env"]) is dict


def test_stdin_cap_at_its_edge():
    import base64
    at_cap = base64.b64encode(b"x" * 524_288).decode()
    assert len(_accepted_field({"stdin": at_cap}).stdin) == 524_288
    assert _accepted_field({"stdin": base64.b64encode(b"\0\1\2").decode()}).stdin == b"\0\1\2"
    _refused_field({"stdin": "A" * (len(at_cap) + 4)}, "spawn.stdin")  # 524,291 bytes, in the text or decoded
    _refused_field({"stdin": "QQ="}, "not valid base64")
    _refused_field({"stdin": "QR=="}, "base64 is not canonical")  # decodes to b"A" but is not how b"A" encodes
    _refused_field({"stdin": "QQ==\n"}, "not valid base64")
    _refused_field({"stdin": "é"}, "not valid base64")
    _refused_field({"stdin": 5}, "expected a string")
    assert to_wire(_accepted_field({"stdin": "QQ=="}))["stdin"] == "QQ=="


def test_stdin_cap_counts_decoded_bytes():  # issue 15 item 4: the base64 text's cap alone lets 524,289 through
    import base64
    _refused_field({"stdin": base64.b64encode(b"x" * 524_289).decode()}, "spawn.stdin")


@pytest.mark.parametrize("channels,ok", [([], True), (["cred"], True), (["audit"], True), (["cred", "audit"], True),
                                         (["audit", "cred"], False), (["cred", "cred"], False), (["tty"], False),
                                         (["cred", "audit", "audit"], False), ("cred", False), ({"cred": 1}, False)])
def test_channel_lists(channels, ok):
    if ok:
        msg = _accepted_field({"channels": channels})
        assert msg.channels == tuple(channels) and to_wire(msg)["channels"] == channels
    else:
        _refused_field({"channels": channels}, "sorted, duplicate-free subset of \\['cred', 'audit'\\]")


def signal_body(**change):
    return {**to_wire(Signal("r1", 4242, "TERM")), **change}


@pytest.mark.parametrize("sig", ["TERM", "INT", "KILL", "HUP"])
def test_the_four_signals(sig):
    assert _accepted_field({"signal": sig}, signal_body).signal == sig


@pytest.mark.parametrize("sig", ["STOP", "USR1", "SIGTERM", "term", "", 15])
def test_other_signals_are_refused(sig):
    _refused_field({"signal": sig}, "signal.signal", signal_body)


def test_pid_edges():
    for pid in (1, 2**22):
        assert _accepted_field({"pid": pid}, signal_body).pid == pid
    for pid in (0, -1, 2**22 + 1, True):
        _refused_field({"pid": pid}, "signal.pid", signal_body)


@pytest.mark.parametrize("req,ok", [("a", True), ("A" * 64, True), ("a-_9Z", True), ("", False), ("A" * 65, False),
                                    ("a/b", False), ("/", False), ("a.b", False), ("a b", False)])
def test_request_ids(req, ok):
    if ok:
        assert _accepted_field({"req": req}, signal_body).req == req
    else:
        _refused_field({"req": req}, "signal.req", signal_body)


EP = "0123abcd-4567-89ef-0123-456789abcdef"


def title_body(**change):
    from protocol.messages import Title
    return {**to_wire(Title("r1", EP, "demo")), **change}


def test_a_title_is_a_maced_request():
    """The broker's title reaches the helper only signed and in sequence, like any request; a
    message kind that is not a request is refused however well it is signed."""
    from protocol.messages import Title
    assert Title.REQUEST is True
    helper, broker = pair()
    helper.receive_data(broker.send(Title("r1", EP, "demo")))
    assert helper.next_event() == Title("r1", EP, "demo") and helper.next_seq == 2
    helper, _ = pair()
    refused_by(helper, encode_frame(canonical.dumps(title_body(seq=1, mac="0" * 64))), "request: bad MAC")


def test_title_endpoint_id_is_a_lower_case_uuid_in_every_group():
    assert _accepted_field({}, title_body).endpoint_id == EP
    groups = EP.split("-")
    for i in range(5):  # a `/`, an upper-case digit, one character too few or too many, in each group
        for bad in ("/" + groups[i][1:], groups[i][:-1] + "/", groups[i][:-1] + "A", groups[i][1:], groups[i] + "a"):
            wrong = "-".join(groups[:i] + [bad] + groups[i + 1:])
            _refused_field({"endpoint_id": wrong}, "title.endpoint_id", title_body)
    for wrong in ("", EP.replace("-", ""), EP + "0", "{" + EP + "}"):
        _refused_field({"endpoint_id": wrong}, "title.endpoint_id", title_body)


@pytest.mark.parametrize("name,ok", [("!", True), ("~", True), ("a" * 128, True), ("demo.ep_1-x", True),
                                     ("", False), (" ", False), ("a b", False), ("\x7f", False), ("\x20a", False),
                                     ("a" * 129, False), ("é", False), ("a\n", False)])
def test_title_names_are_printable_ascii_without_spaces(name, ok):
    if ok:
        assert _accepted_field({"name": name}, title_body).name == name
    else:
        _refused_field({"name": name}, "title.name", title_body)


def test_helper_event_edges():
    from protocol.messages import Challenge, Hello, Signaled
    def wire(msg, **change):
        return {**to_wire(msg), **change}
    assert from_wire(wire(Exited(1, -64))).status == -64 and from_wire(wire(Exited(1, 255))).status == 255
    for status in (-65, 256, True):
        with pytest.raises(ProtocolError, match="exited.status"):
            from_wire(wire(Exited(1, 0), status=status))
    for code in ("a", "a" * 32, "limit-user", "pam-acct-mgmt", "a9"):
        assert from_wire(wire(Refused("r", "x", ""), code=code)).code == code
    for code in ("", "a" * 33, "A", "9a", "-a", "/a", "a/", "a_b"):
        with pytest.raises(ProtocolError, match="refused.code"):
            from_wire(wire(Refused("r", "x", ""), code=code))
    assert from_wire(wire(Refused("r", "x", "y" * 1024))).reason == "y" * 1024
    assert from_wire(wire(Refused("r", "x", "see ../log"))).reason == "see ../log"
    with pytest.raises(ProtocolError, match="refused.reason is longer than 1024"):
        from_wire(wire(Refused("r", "x", "y" * 1025)))
    assert from_wire(wire(Signaled("r", 7))) == Signaled("r", 7)
    nonce = "0123456789abcdef" * 4
    assert from_wire(wire(Challenge(1, nonce, 4096, ""))) == Challenge(1, nonce, 4096, "")
    for bad in (nonce[:-1], nonce + "0", nonce.upper(), "/" * 64, "g" * 64):
        with pytest.raises(ProtocolError, match="challenge.nonce"):
            from_wire(wire(Challenge(1, bad, 4096, "")))
    for version in (0, 2, True):
        with pytest.raises(ProtocolError, match="hello.version"):
            from_wire(wire(Hello(1, nonce), version=version))


def test_challenge_max_frame_and_pam_at_their_edges():
    """The helper announces its policy's frame cap (1..2^20, as the policy allows) and PAM service
    (at most 128 characters; empty when PAM is off): the broker refuses a challenge outside them."""
    from protocol.messages import Challenge
    nonce = "0123456789abcdef" * 4
    for max_frame in (1, 2**20):
        assert from_wire(to_wire(Challenge(1, nonce, max_frame, ""))).max_frame == max_frame
    for max_frame in (0, 2**20 + 1, True):
        with pytest.raises(ProtocolError, match="challenge.max_frame"):
            from_wire(to_wire(Challenge(1, nonce, max_frame, "")))
    for pam in ("", "p" * 128, "globus-compute-endpoint"):
        assert from_wire(to_wire(Challenge(1, nonce, 4096, pam))).pam == pam
    for pam in ("p" * 129, None, "a\x00"):
        with pytest.raises(ProtocolError, match="challenge.pam"):
            from_wire(to_wire(Challenge(1, nonce, 4096, pam)))


@pytest.mark.parametrize("obj,words", [([], "not an object"), ("spawn", "not an object"), ({}, "unknown message type"),
                                       ({"type": 5}, "unknown message type"), ({"type": ["spawn"]}, "unknown message type"),
                                       ({"type": {"a": 1}}, "unknown message type")])
def test_from_wire_refuses_shapes(obj, words):
    with pytest.raises(ProtocolError, match=words):
        from_wire(obj)


def test_message_kinds():
    from protocol.messages import Challenge, Hello, Pong, Signaled
    from protocol.messages import Title
    assert {cls.TYPE for cls in (Spawn, Signal, Ping, Title) if cls.REQUEST} == {"spawn", "signal", "ping", "title"}
    assert not any(cls.REQUEST for cls in (Challenge, Hello, Spawned, Refused, Signaled, Exited, Pong))
    assert Ping("a") != Ping("b") and (Ping("a") != Ping("a")) is False
    with pytest.raises(AttributeError):
        Ping("a").extra = 1  # __slots__ = (): no instance dict to smuggle state in


def test_wire_names():
    """The `type` strings are the wire format both sides (and docs/root-code.md) agree on."""
    from protocol.messages import HELPER_EVENTS, REGISTRY
    assert set(REGISTRY) == {"challenge", "hello", "spawn", "signal", "ping", "title", "spawned", "refused", "signaled",
                             "exited", "pong"}
    assert all(REGISTRY[name].TYPE == name for name in REGISTRY)
    assert {cls.TYPE for cls in HELPER_EVENTS} == {"spawned", "refused", "signaled", "exited", "pong"}
    assert to_wire(Spawned("r", 5, ("cred",))) == {"type": "spawned", "req": "r", "pid": 5, "channels": ["cred"]}


# -- the session's rules ---------------------------------------------------------------------------------

def test_known_answer_macs():
    """The MAC inputs are part of the wire format (docs/root-code.md): pin them, not just their agreement."""
    import hashlib
    import hmac as hmac_mod
    from protocol.session import hello_mac, request_mac
    nonce = bytes(range(32, 64))
    assert hello_mac(KEY, nonce) == hmac_mod.new(KEY, b"mep-hello\0" + nonce, hashlib.sha256).hexdigest()
    assert request_mac(KEY, nonce, b"{}") == hmac_mod.new(KEY, b"mep-req\0" + nonce + b"{}", hashlib.sha256).hexdigest()


@pytest.mark.parametrize("key", [b"", bytes(31), bytes(33), "k" * 32, bytearray(32), None])
def test_session_key_must_be_32_bytes(key):
    with pytest.raises(ValueError, match="exactly 32 bytes"):
        HelperSession(key)
    with pytest.raises(ValueError, match="exactly 32 bytes"):
        BrokerSession(key)


def test_helper_nonce_and_challenge():
    helper = HelperSession(KEY, max_frame=4096, pam="login")
    assert type(helper.nonce) is bytes and len(helper.nonce) == 32 and helper.nonce != HelperSession(KEY).nonce
    assert helper.state == "start" and helper.next_seq == 1
    frame = helper.challenge()
    body = json.loads(frame[4:])
    assert body == {"type": "challenge", "version": 1, "nonce": helper.nonce.hex(), "max_frame": 4096, "pam": "login"}
    assert helper.state == "await-hello"
    assert json.loads(HelperSession(KEY).challenge()[4:])["pam"] == ""  # no service named: PAM is off
    with pytest.raises(ProtocolError, match="challenge is not allowed in state 'await-hello'"):
        helper.challenge()
    assert helper.state == "error"


def signed(helper, body, seq=None):
    """A request body signed with the right key for `helper`'s nonce, as a hostile broker could send it."""
    from protocol.session import request_mac
    body = dict(body, seq=helper.next_seq if seq is None else seq)
    body["mac"] = request_mac(KEY, helper.nonce, canonical.dumps(body))
    return encode_frame(canonical.dumps(body))


def refused_by(helper, frame, words):
    helper.receive_data(frame)
    with pytest.raises(ProtocolError, match=words):
        helper.next_event()
    assert helper.state == "error"


def test_seq_must_be_an_integer_not_a_bool():
    helper, _ = pair()
    refused_by(helper, signed(helper, {"type": "ping", "req": "p"}, seq=True), r"request seq True, expected 1")
    helper, _ = pair()
    refused_by(helper, signed(helper, {"type": "ping", "req": "p"}, seq="1"), r"request seq '1', expected 1")
    helper, _ = pair()
    helper.receive_data(signed(helper, {"type": "ping", "req": "p"}, seq=1))
    assert helper.next_event() == Ping("p") and helper.next_seq == 2
    helper.receive_data(signed(helper, {"type": "ping", "req": "q"}, seq=2))
    assert helper.next_event() == Ping("q") and helper.next_seq == 3


@pytest.mark.parametrize("mac", [None, 5, "0" * 63, "0" * 65, "G" * 64, "A" * 64, ["0" * 64], "é" * 64])
def test_missing_or_malformed_request_mac_is_a_protocol_error(mac):
    helper, _ = pair()
    body = {"type": "ping", "req": "p", "seq": 1}
    if mac is not None:
        body["mac"] = mac
    refused_by(helper, encode_frame(canonical.dumps(body)), "request without a well-formed mac")


def test_request_mac_covers_seq_and_every_field():
    helper, _ = pair()
    frame = bytearray(signed(helper, {"type": "ping", "req": "p"}))
    body = json.loads(frame[4:])
    body["req"] = "q"  # the MAC no longer matches
    refused_by(helper, encode_frame(canonical.dumps(body)), "request: bad MAC")


@pytest.mark.parametrize("body,words", [
    ({"type": "pong", "req": "p"}, "'pong' is not a request"),
    ({"type": "exited", "pid": 1, "status": 0}, "'exited' is not a request"),
    ({"type": "nope"}, "'nope' is not a request"),
    ({"type": ["ping"]}, "is not a request"),
    ({"type": 5}, "is not a request"),
    ({"req": "p"}, "is not a request"),
    ({"type": "hello", "version": 1, "mac": "0" * 64}, "second hello"),
    ({"type": "ping", "req": "p", "extra": 1}, "unexpected keys \\['extra'\\]"),
])
def test_what_a_ready_helper_refuses(body, words):
    helper, _ = pair()
    refused_by(helper, signed(helper, body), words)


def test_a_body_that_is_not_an_object_is_refused_in_every_state():
    helper = HelperSession(KEY)
    helper.challenge()
    refused_by(helper, encode_frame(b"[]"), "message is not an object")
    helper, _ = pair()
    refused_by(helper, encode_frame(b'"ping"'), "message is not an object")


def test_before_the_hello():
    helper = HelperSession(KEY)
    refused_by(helper, encode_frame(canonical.dumps({"type": "ping", "req": "p", "seq": 1, "mac": "0" * 64})),
               "no message expected in state 'start'")  # before the challenge was even sent
    helper = HelperSession(KEY)
    helper.challenge()
    with pytest.raises(ProtocolError, match="cannot send Exited in state 'await-hello'"):
        helper.send(Exited(1, 0))  # no event before the broker has proved the key
    helper = HelperSession(KEY)
    with pytest.raises(ProtocolError, match="cannot send Pong in state 'start'"):
        from protocol.messages import Pong
        helper.send(Pong("p"))
    helper = HelperSession(KEY)
    helper.challenge()
    refused_by(helper, encode_frame(canonical.dumps({"type": "hello", "version": 1, "mac": "0" * 64})), "bad MAC")
    helper = HelperSession(KEY)
    helper.challenge()
    from protocol.session import hello_mac
    refused_by(helper, encode_frame(canonical.dumps({"type": "hello", "version": 1, "mac": hello_mac(KEY, helper.nonce),
                                                     "seq": 1})), "unexpected keys")
    helper = HelperSession(KEY)
    helper.challenge()
    good = {"type": "hello", "version": 1, "mac": hello_mac(KEY, helper.nonce)}
    helper.receive_data(encode_frame(canonical.dumps(good)))
    assert helper.next_event().TYPE == "hello" and helper.state == "ready"


def test_every_helper_event_can_be_sent_when_ready():
    from protocol.messages import Pong, Signaled
    helper, broker = pair()
    for ev in (Spawned("r", 1, ()), Refused("r", "x", "why"), Signaled("r", 2), Exited(3, -9), Pong("r")):
        broker.receive_data(helper.send(ev))
        assert broker.next_event() == ev
    for not_an_event in (Ping("r"), Signal("r", 1, "TERM"), Spawn("r", "a", 1, "u", {}, b"", ())):
        with pytest.raises(ProtocolError, match="cannot send"):
            helper.send(not_an_event)


def test_end_of_stream():
    from protocol.session import CLOSED
    helper, broker = pair()
    helper.receive_data(broker.send(Ping("a")))
    helper.receive_data(b"")
    assert helper.next_event() == Ping("a")  # what came before the end is still delivered
    assert helper.next_event() is CLOSED and helper.state == "closed"
    with pytest.raises(ProtocolError, match="session is closed"):
        helper.next_event()
    with pytest.raises(ProtocolError, match="session is closed"):
        helper.receive_data(b"x")
    with pytest.raises(ProtocolError, match="session is closed"):
        helper.send(Exited(1, 0))
    helper, broker = pair()
    assert helper.next_event() is NEED_DATA and helper.state == "ready"
    helper.receive_data(broker.send(Ping("a"))[:5])
    assert helper.partial is True and helper.next_event() is NEED_DATA
    helper.receive_data(b"")
    with pytest.raises(ProtocolError, match="connection closed inside a frame"):
        helper.next_event()
    assert helper.state == "error"
    with pytest.raises(ProtocolError, match="session is error"):
        helper.next_event()


def _limited_pair(max_frame):
    helper, broker = HelperSession(KEY, max_frame=max_frame), BrokerSession(KEY)
    broker.receive_data(helper.challenge())
    broker.next_event()
    helper.receive_data(broker.hello())
    helper.next_event()
    return helper, broker


def test_helper_session_max_frame():
    helper, _ = _limited_pair(200)
    helper.receive_data(b"\0\0\0\xc8")  # exactly the limit: fine
    helper, _ = _limited_pair(200)
    with pytest.raises(ProtocolError, match="exceeds the limit of 200"):
        helper.receive_data(b"\0\0\0\xc9")
    assert helper.state == "error"  # a bad header latches the error like any other violation
    with pytest.raises(ProtocolError, match="session is error"):
        helper.receive_data(b"")
    with pytest.raises(ProtocolError, match="outside 1..200"):
        _limited_pair(200)[0].send(Refused("r", "x", "y" * 200))  # the helper's own frames obey its limit too
    helper, broker = _limited_pair(200)
    broker.receive_data(helper.send(Refused("r", "x", "y" * 100)))
    assert broker.next_event().reason == "y" * 100
