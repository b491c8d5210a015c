"""The channel to the helper (SECURITY-REVIEW 1-4), against a live helper: each broken
frame, body or session step ends the connection, and nothing is spawned."""

import json
import os
import socket
import subprocess
import time

import pytest

from broker.protocol_session import BrokerSession
from protocol import canonical
from protocol.framing import encode_frame
from protocol.messages import Ping, Spawn
from tests.rigs import procs
from tests.rigs.helper import PYTHON

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("no_strays")]


def valid_spawn_frame(client, accounts) -> bytes:
    alice = accounts.alice
    return client.session.send(Spawn("s1", alice.pw_name, alice.pw_uid, "uep", {}, b'{"sleep": 3}', ()))


def assert_fatal(helper, accounts, *log_words):
    assert helper.wait() == 2, helper.output()
    out = helper.output()
    for word in log_words:
        assert word in out, out
    assert "session process" not in out  # nothing was even forked
    assert procs.processes_of(accounts.alice.pw_name) == []


# -- 2: frames ------------------------------------------------------------------------------

def test_oversized_frame_is_refused_at_the_header(helpers, accounts):
    helper, client = helpers(max_frame=4096)
    client.sock.sendall((4097).to_bytes(4, "big") + b"{" + valid_spawn_frame(client, accounts))
    assert_fatal(helper, accounts, "exceeds the limit of 4096")


def test_zero_length_frame(helpers, accounts):
    helper, client = helpers()
    client.sock.sendall(b"\0\0\0\0" + valid_spawn_frame(client, accounts))
    assert_fatal(helper, accounts, "zero-length frame")


def test_truncated_frame(helpers, accounts):
    helper, client = helpers()
    client.sock.sendall(valid_spawn_frame(client, accounts)[:-1])
    client.sock.shutdown(socket.SHUT_WR)
    assert_fatal(helper, accounts, "connection closed inside a frame")


def test_trailing_bytes_in_a_frame(helpers, accounts):
    helper, client = helpers()
    frame = valid_spawn_frame(client, accounts)
    body = frame[4:] + b" "
    client.sock.sendall(len(body).to_bytes(4, "big") + body)
    assert_fatal(helper, accounts, "not in canonical form")


def test_slow_loris_partial_frame_then_silence(helpers, accounts):
    helper, client = helpers(io_timeout_seconds=1)
    frame = valid_spawn_frame(client, accounts)
    client.sock.sendall(frame[:10])
    started = time.monotonic()
    assert_fatal(helper, accounts, "no complete frame within 1s")
    assert time.monotonic() - started < 10


def test_no_hello_within_the_timeout(helpers, accounts):
    helper, client = helpers(handshake=False, io_timeout_seconds=1)
    assert_fatal(helper, accounts, "no complete hello within 1s")


# -- 3: the decoder, with a correctly signed body where a signature is possible ---------------

BASE = {"type": "spawn", "req": "d1", "username": "mept-alice", "uid": 0, "name": "uep", "env": {}, "stdin": "", "channels": []}


@pytest.mark.parametrize("change,words", [
    ({"uid": "1001"}, "expected an integer"),
    ({"uid": True}, "expected an integer"),
    ({"uid": 1.0}, "floats are not allowed"),
    ({"extra": 1}, "unexpected keys ['extra']"),
    ({"name": None}, "expected a string"),
    ({"stdin": "A" * 700_000}, "longer than"),
    ({"type": "exec"}, "'exec' is not a request"),
    ({"type": "spawned"}, "'spawned' is not a request"),
    ({"channels": ["cred", "cred"]}, "duplicate-free"),
    ({"env": {"A": 1}}, "expected a string"),
])
def test_decoder_refuses_signed_but_malformed(helpers, accounts, change, words):
    helper, client = helpers()
    body = {**BASE, "uid": accounts.alice.pw_uid, **change}
    if type(change.get("uid")) is float:  # canonical.dumps refuses floats, so write the bytes by hand
        client.sock.sendall(encode_frame(json.dumps(dict(body, seq=1, mac="0" * 64), sort_keys=True,
                                                    separators=(",", ":")).encode()))
    else:
        client.send_unchecked(body)
    assert_fatal(helper, accounts, words)


def test_missing_key(helpers, accounts):
    helper, client = helpers()
    body = dict(BASE, uid=accounts.alice.pw_uid)
    del body["env"]
    client.send_unchecked(body)
    assert_fatal(helper, accounts, "missing keys ['env']")


@pytest.mark.parametrize("raw,words", [
    (b'{"req":"a","req":"b","type":"ping"}', "duplicate key"),
    (b'{"n":NaN,"type":"ping"}', "NaN is not allowed"),
    (b'{"n":Infinity,"type":"ping"}', "Infinity is not allowed"),
    (b'{"req":"\xff\xfe","type":"ping"}', "invalid JSON"),
    (b'[1,2]', "not an object"),
])
def test_decoder_refuses_raw_bodies(helpers, accounts, raw, words):
    helper, client = helpers()
    client.sock.sendall(encode_frame(raw))
    assert_fatal(helper, accounts, words)


# -- 4: the session -------------------------------------------------------------------------

def test_bad_mac(helpers, accounts):
    helper, client = helpers()
    frame = bytearray(valid_spawn_frame(client, accounts))
    i = frame.index(b'"mac":"') + 8
    frame[i] = ord("0") if frame[i] != ord("0") else ord("1")
    client.sock.sendall(bytes(frame))
    assert_fatal(helper, accounts, "bad MAC")


def test_replayed_seq(helpers, accounts):
    helper, client = helpers()
    ping = client.session.send(Ping("p1"))
    client.sock.sendall(ping)
    assert client.reply("p1").type == "pong"
    client.sock.sendall(ping)
    assert_fatal(helper, accounts, "request seq 1, expected 2")


def test_skipped_seq(helpers, accounts):
    helper, client = helpers()
    client.session.next_seq = 2
    client.sock.sendall(client.session.send(Ping("p1")))
    assert_fatal(helper, accounts, "request seq 2, expected 1")


def test_second_hello(helpers, accounts, rigdir):
    helper, client = helpers()
    from protocol.session import hello_mac
    client.sock.sendall(encode_frame(canonical.dumps({"type": "hello", "version": 1,
                                                      "mac": hello_mac(rigdir.key, client.session.nonce)})))
    assert_fatal(helper, accounts, "second hello")


def test_request_before_hello(helpers, accounts):
    helper, client = helpers(handshake=False)
    client.next_event()  # the challenge
    client.session.state = "ready"  # pretend: sign a request without saying hello
    client.sock.sendall(client.session.send(Ping("p1")))
    assert_fatal(helper, accounts, "expected hello, got 'ping'")


def test_hello_with_the_wrong_key(helpers, accounts, rigdir):
    helper, client = helpers(handshake=False)
    client.session = BrokerSession(bytes(32))
    client.handshake()
    assert_fatal(helper, accounts, "hello: bad MAC")


def test_recorded_request_fails_on_a_new_connection(helpers, accounts):
    helper1, client1 = helpers()
    recorded = valid_spawn_frame(client1, accounts)
    helper2, client2 = helpers()
    client2.sock.sendall(recorded)  # same key, same seq 1, but a new nonce
    assert_fatal(helper2, accounts, "request: bad MAC")
    assert helper1.proc.poll() is None  # the first connection is untouched


# -- 1: who may connect ----------------------------------------------------------------------

@pytest.mark.parametrize("case,words", [
    ("wrong-pid", "does not name this process"),
    ("two-fds", "expected exactly 1"),
    ("not-a-socket", "is not a socket"),
    ("listening", "is a listening socket"),
    ("datagram", "expected a unix stream socket"),
    ("tcp", "expected a unix stream socket"),
])
def test_socket_activation_environment_is_checked(rigdir, case, words):
    """1: LISTEN_PID must name the helper, LISTEN_FDS must be 1, fd 3 a connected unix
    stream socket. Each failure stops the helper before any protocol byte."""
    policy = rigdir.policy()
    closers = []
    if case in ("wrong-pid", "two-fds"):
        a, b = socket.socketpair()
        closers += [a, b]
        fd = b.fileno()
    elif case == "not-a-socket":
        fd = os.open("/dev/null", os.O_RDONLY)
    elif case == "listening":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(rigdir.path / f"l-{os.getpid()}.sock"))
        s.listen()
        closers.append(s)
        fd = s.fileno()
    elif case == "datagram":
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        closers += [a, b]
        fd = b.fileno()
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        closers.append(s)
        fd = s.fileno()
    # LISTEN_PID is the pid of the exec'd helper: the child's own pid, known in preexec
    boot = ("import os, sys; os.dup2(%d, 3); os.environ['LISTEN_PID'] = %s; os.environ['LISTEN_FDS'] = %r; "
            "os.execv(sys.argv[1], sys.argv[1:])")
    pid_expr = "'1'" if case == "wrong-pid" else "str(os.getpid())"
    fds = "2" if case == "two-fds" else "1"
    cmd = ["/usr/bin/python3", "-c", boot % (fd, pid_expr, fds), *rigdir.helper_cmd(policy, "--socket-activated")]
    out = subprocess.run(cmd, pass_fds=(fd,), capture_output=True, text=True, timeout=20, env={"PATH": "/usr/bin:/bin"})
    for c in closers:
        c.close()
    assert out.returncode == 64, out.stderr
    assert words in out.stderr


BROKER_SCRIPT = """
import socket, sys
sys.path.insert(0, sys.argv[1])
from broker.protocol_session import BrokerSession
from protocol.session import NEED_DATA
from protocol.messages import Ping
key = open(sys.argv[2], "rb").read()
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.connect(sys.argv[3]); s.settimeout(10)
session = BrokerSession(key)
def event():
    while (e := session.next_event()) is NEED_DATA:
        session.receive_data(s.recv(65536))
    return e
print(event().TYPE, flush=True)
s.sendall(session.hello()); s.sendall(session.send(Ping("p1")))
print(event().TYPE, flush=True)
"""


def test_socket_activated_helper_serves_only_the_broker_uid(rigdir, accounts):
    """1: through systemd-socket-activate --accept (Debian's systemd package): the broker
    account gets a challenge and a pong; root and another user are refused before the
    helper reads a byte, and get no challenge."""
    sock_path = rigdir.path / f"helper-{os.getpid()}.sock"
    log = open(rigdir.path / "activate.log", "w+")
    activator = subprocess.Popen(
        ["systemd-socket-activate", "--accept", "-l", str(sock_path), *rigdir.helper_cmd(rigdir.policy(), "--socket-activated")],
        stdout=log, stderr=subprocess.STDOUT, env={"PATH": "/usr/bin:/bin"})
    try:
        for _ in range(200):
            if sock_path.exists():
                break
            time.sleep(0.05)
        os.chmod(sock_path, 0o666)
        script = rigdir.file("sa_broker.py", BROKER_SCRIPT)
        ok = subprocess.run([PYTHON, "-I", str(script), str(rigdir.lib), str(rigdir.key_file), str(sock_path)],
                            user=accounts.broker.pw_uid, group=accounts.broker.pw_gid, capture_output=True, text=True, timeout=30)
        assert ok.stdout.split() == ["challenge", "pong"], ok.stderr
        for uid in (0, accounts.carol.pw_uid):  # root, then an ordinary user
            other = subprocess.run(
                [PYTHON, "-I", "-c", "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
                 "s.settimeout(10); print(repr(s.recv(100)))", str(sock_path)],
                user=uid, capture_output=True, text=True, timeout=30)
            assert other.stdout.strip() == "b''", other  # closed without a challenge
        time.sleep(0.3)
        log.flush()
        text = (rigdir.path / "activate.log").read_text()
        assert text.count("refused before reading") == 2, text
        assert f"uid {accounts.carol.pw_uid}, not the broker uid {accounts.broker.pw_uid}" in text
    finally:
        activator.terminate()
        activator.wait(10)
        log.close()
