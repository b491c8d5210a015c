"""The helper's layer of the test rig: the root-owned rig directory (policies, key, probe
and a copy of the code the helper runs), the helper as a process, and a synchronous
broker speaking the protocol to it.

The helper always runs from the rig directory's root-owned copy of the packages
(/run/mept-XXXX/lib), as mep-privhelper runs from a root-owned tree: `RigDir.helper_cmd`
is the one place that builds its command line.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import socket
import struct
import subprocess
import tempfile
import types
from pathlib import Path

from broker.protocol_session import BrokerSession
from protocol import canonical
from protocol.framing import FrameReader, encode_frame
from protocol.session import CLOSED, NEED_DATA
from protocol.session import request_mac
from protocol.messages import Challenge, Spawn
from tests.rigs.accounts import PREFIX, Accounts
from tests.rigs.procs import reap, run, wait_for

ROOT = Path(__file__).resolve().parents[2]  # the checkout
RIGS = Path(__file__).resolve().parent
PYTHON = "/usr/bin/python3"  # root-owned, reachable by every test account


# -- the root-owned policy directory ---------------------------------------------------

def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, str)):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(value)


def toml(table: dict) -> str:
    lines, subtables = [], []
    for key, value in table.items():
        if isinstance(value, dict):
            subtables.append(f"\n[{key}]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in value.items()))
        else:
            lines.append(f"{key} = {_toml(value)}\n")
    return "".join(lines) + "".join(subtables)


class RigDir:
    """/run/mept-XXXX: root-owned 0755, holding the probe, the key, policies, logs and
    lib/, the root-owned copy of the code every helper of the session runs from."""

    def __init__(self, accounts: Accounts):
        self.accounts = accounts
        self.path = Path(tempfile.mkdtemp(prefix=PREFIX, dir="/run"))
        os.chmod(self.path, 0o755)
        self.probe = self.path / "probe"
        shutil.copyfile(ROOT / "scripts" / "probe.py", self.probe)
        os.chmod(self.probe, 0o755)
        self.key = secrets.token_bytes(32)
        self.key_file = self.path / "key"
        self.key_file.write_bytes(self.key)
        # the packages the helper runs (helper_cmd) and a launched test broker imports
        self.lib = self.path / "lib"
        for package in ("protocol", "privhelper", "broker", "localservice"):
            shutil.copytree(ROOT / package, self.lib / package, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(ROOT / "systemd", self.path / "systemd")  # the unit templates, beside lib/ as in a checkout
        shutil.copyfile(RIGS / "testbroker.py", self.path / "testbroker.py")
        run("chmod", "-R", "go-w,a+rX", str(self.path))
        os.chown(self.key_file, 0, accounts.broker.pw_gid)
        os.chmod(self.key_file, 0o640)
        self._n = 0

    def policy(self, **overrides) -> Path:
        table = {
            "broker_user": self.accounts.broker.pw_name,
            "key_file": str(self.key_file),
            "uep_argv": [str(self.probe), "start", "{name}"],
            "stop_grace_seconds": 1,
            "io_timeout_seconds": 2,
        }
        table.update(overrides)
        table = {k: v for k, v in table.items() if v is not None}
        self._n += 1
        path = self.path / f"policy-{self._n}.toml"
        path.write_text(toml(table))
        os.chmod(path, 0o644)
        return path

    def file(self, name: str, text: str, mode=0o644) -> Path:
        path = self.path / name
        path.write_text(text)
        os.chmod(path, mode)
        return path

    def helper_cmd(self, policy: Path, *mode: str) -> list:
        """The helper as mep-privhelper runs it: python3 -I -S, only its own code (this
        directory's root-owned copy) on sys.path."""
        from privhelper.__main__ import isolated_argv
        return isolated_argv(PYTHON, str(self.lib), ["--policy", str(policy), *mode])


# -- the helper -------------------------------------------------------------------------

class Helper:
    """A helper process serving one end of a socketpair; the test holds the other."""

    def __init__(self, rigdir: RigDir, policy: Path):
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.log_path = rigdir.path / f"helper-{secrets.token_hex(4)}.log"
        self.log = open(self.log_path, "w+")
        self.proc = subprocess.Popen(rigdir.helper_cmd(policy, "--fd", str(theirs.fileno())), pass_fds=[theirs.fileno()],
                                     stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)
        theirs.close()

    def wait(self, timeout=15) -> int:
        return self.proc.wait(timeout)

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text()

    def stop(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
        reap(self.proc, 15)
        self.log.close()


class Client:
    """A synchronous broker: broker.protocol_session.BrokerSession over a blocking socket."""

    def __init__(self, sock: socket.socket, key: bytes, timeout=10):
        self.sock = sock
        self.sock.settimeout(timeout)
        self.key = key
        self.session = BrokerSession(key)
        self.fds: list[int] = []
        self.channel_fds: dict[str, dict] = {}
        self.events: list = []
        self._n = 0

    def handshake(self) -> Challenge:
        challenge = self.next_event()
        assert isinstance(challenge, Challenge), challenge
        self.sock.sendall(self.session.hello())
        return challenge

    def next_event(self):
        """The next event; a `spawned` takes its SCM_RIGHTS fds off the queue right away,
        so that fds and frames stay paired however the events are consumed later."""
        while (event := self.session.next_event()) is NEED_DATA:
            data, fds, _, _ = socket.recv_fds(self.sock, 65536, 16)
            self.fds.extend(fds)
            self.session.receive_data(data)
        if getattr(event, "TYPE", None) == "spawned":
            self.channel_fds[event.req] = {name: self.fds.pop(0) for name in event.channels}
        return event

    def request(self, msg) -> None:
        self.sock.sendall(self.session.send(msg))

    def send_unchecked(self, body: dict) -> None:
        """Sign and send a request body without the encoder's checks, as a broken or
        hostile broker holding the key could."""
        body = dict(body, seq=self.session.next_seq)
        body["mac"] = request_mac(self.key, self.session.nonce, canonical.dumps(body))
        self.session.next_seq += 1
        self.sock.sendall(encode_frame(canonical.dumps(body)))

    def req_id(self) -> str:
        self._n += 1
        return f"t{self._n}"

    def spawn(self, user: pwd.struct_passwd | str, uid=None, name="uep1", env=None, stdin=b"", channels=("cred", "audit")):
        if isinstance(user, pwd.struct_passwd):
            user, uid = user.pw_name, user.pw_uid if uid is None else uid
        req = self.req_id()
        self.request(Spawn(req, user, uid, name, dict(env or {}), stdin, tuple(channels)))
        return self.reply(req)

    def reply(self, req: str):
        """The reply to `req`, with the fds that came with it; other events that arrive
        first are kept in self.events."""
        event = self._wait(lambda e: getattr(e, "req", None) == req)
        return types.SimpleNamespace(**event._asdict(), type=event.TYPE, fds=self.channel_fds.pop(req, {}))

    def wait_exited(self, pid: int):
        return self._wait(lambda e: e.TYPE == "exited" and e.pid == pid)

    def _wait(self, match):
        for event in self.events:
            if match(event):
                self.events.remove(event)
                return event
        while (event := self.next_event()) is not CLOSED:
            if match(event):
                return event
            self.events.append(event)
        raise EOFError("helper closed the connection")


def read_report(fd: int, timeout=10) -> dict:
    """The probe's JSON line from its audit pipe."""
    buf = bytearray()
    os.set_blocking(fd, False)

    def line_in():
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return False
        if not chunk:
            raise EOFError(f"audit pipe closed without a report (got {bytes(buf[:200])!r})")
        buf.extend(chunk)
        return b"\n" in buf
    try:
        wait_for(line_in, timeout, 0.01, what="a report from the probe")
    except AssertionError as e:
        raise AssertionError(f"{e} (got {bytes(buf[:200])!r})") from None
    return json.loads(buf.partition(b"\n")[0])


# -- the helper started otherwise: --launch with the test broker, a fork server -----------

class Launched:
    """`mep-privhelper --launch`: the helper as root, the test broker (testbroker.py) as
    mept-broker, spawning `spawns` ({"user", "uid", "stdin"} each) and printing what came."""

    def __init__(self, rigdir: RigDir, spawns, **policy):
        broker_argv = [PYTHON, "-I", str(rigdir.path / "testbroker.py"), str(rigdir.lib), str(rigdir.key_file),
                       json.dumps(spawns)]
        self.log_path = rigdir.path / f"launch-{secrets.token_hex(4)}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(rigdir.helper_cmd(rigdir.policy(broker_argv=broker_argv, **policy), "--launch"),
                                     stdout=subprocess.PIPE, stderr=self.log, stdin=subprocess.DEVNULL, text=True)
        self.lines = []
        while True:
            line = self.proc.stdout.readline()
            assert line, f"broker ended early; helper log:\n{self.log_path.read_text()}"
            self.lines.append(json.loads(line))
            if self.lines[-1] == "ready":
                break
        self.broker = self.lines[0]
        self.ueps = [entry for entry in self.lines if isinstance(entry, dict) and "pid" in entry and "report" in entry]

    def session_pids(self):
        out = run("pgrep", "-P", str(self.proc.pid), check=False).stdout.split()
        return [int(p) for p in out if int(p) != self.broker["broker_pid"]]

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.log.close()


class ForkServer:
    """forkserver.py as a process: a fresh helper (forked from one that loaded `policy`
    from the rig directory's code) for each case."""

    def __init__(self, rigdir: RigDir, policy: Path):
        self.control, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.log_path = rigdir.path / f"fuzz-{secrets.token_hex(4)}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([PYTHON, "-I", "-S", str(RIGS / "forkserver.py"), str(rigdir.lib), str(policy),
                                      str(theirs.fileno())], pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        theirs.close()
        self.key = rigdir.key

    def case(self, script, answers: int = 0, whole_helper: bool = False) -> tuple:
        """Run one connection: `script(broker_session)` returns the chunks to send once
        the challenge is in; the write side is closed after them, once `answers` replies
        to requests have come (as a broker waits for its answers before it goes).
        Returns the helper's wait status, the replies (decoded) and its log of the case."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        start = self.log_path.stat().st_size
        socket.send_fds(self.control, [b"m" if whole_helper else b"r"], [theirs.fileno()])
        theirs.close()
        ours.settimeout(20)
        session, reader, replies = BrokerSession(self.key), FrameReader(), []
        try:
            while (frame := reader.next_frame()) is None:
                data = ours.recv(65536)
                assert data, "the helper sent no challenge"
                reader.feed(data)
            session.receive_data(encode_frame(frame))
            session.next_event()
            for chunk in script(session):
                ours.sendall(chunk)
            while sum(r.get("type") in ("spawned", "refused", "signaled", "pong") for r in replies) < answers:
                if not self._receive(ours, reader, replies):
                    break
            ours.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the helper ended the connection first: the outcome says why
        try:
            while self._receive(ours, reader, replies):
                pass
        except ConnectionResetError:
            pass
        finally:
            ours.close()
        [status] = struct.unpack(">i", self.control.recv(4))
        self.log.flush()
        with open(self.log_path, "rb") as f:
            f.seek(start)
            log = f.read().decode("utf-8", "replace")
        return status, replies, log

    @staticmethod
    def _receive(sock, reader, replies) -> bool:
        data, fds, _, _ = socket.recv_fds(sock, 65536, 4)
        for fd in fds:
            os.close(fd)
        reader.feed(data)
        while (frame := reader.next_frame()) is not None:
            replies.append(json.loads(frame))
        return bool(data)

    def close(self) -> None:
        self.control.close()
        reap(self.proc, 10)
        self.log.close()
