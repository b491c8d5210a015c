"""The test rig: real users, a root-owned policy directory, PAM services, the real helper.

Everything it creates is named with the `mept-` prefix and removed by `cleanup()`, which
conftest.py runs at the start (leftovers of a killed run) and at the end of the session.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

from broker.protocol_session import BrokerSession
from protocol import canonical
from protocol.framing import encode_frame
from protocol.session import CLOSED, NEED_DATA
from protocol.session import request_mac
from protocol.messages import Challenge, Spawn

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "mept-"
PAM_DIR = Path("/etc/pam.d")
PYTHON = "/usr/bin/python3"  # root-owned, reachable by every test account


def run(*cmd, check=True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


# -- accounts ---------------------------------------------------------------------------

def add_user(name: str, *, system=False, uid=None, shell="/bin/bash", groups=(), non_unique=False) -> pwd.struct_passwd:
    cmd = ["useradd", "--shell", shell]
    cmd += ["--system", "--no-create-home"] if system else ["--create-home"]
    if uid is not None:
        cmd += ["--uid", str(uid)] + (["--non-unique"] if non_unique else [])
    if groups:
        cmd += ["--groups", ",".join(groups)]
    run(*cmd, name)
    return pwd.getpwnam(name)


def cleanup() -> None:
    """Remove every mept- user, group, PAM service and rig directory."""
    with open("/etc/passwd") as f:
        users = [line.split(":")[0] for line in f if line.startswith(PREFIX)]
    for user in users:
        run("pkill", "-KILL", "-u", user, check=False)
    for user in reversed(users):  # aliases (non-unique uids) were added last
        run("userdel", "--force", "--remove", user, check=False)
    with open("/etc/group") as f:
        groups = [line.split(":")[0] for line in f if line.startswith(PREFIX)]
    for group in groups:
        run("groupdel", group, check=False)
    for path in PAM_DIR.glob(PREFIX + "*"):
        path.unlink()
    for path in Path("/run").glob(PREFIX + "*"):
        shutil.rmtree(path, ignore_errors=True)


class Accounts:
    """The session's test accounts, by role."""

    def __init__(self):
        run("groupadd", PREFIX + "denygrp")
        run("groupadd", PREFIX + "science")
        self.broker = add_user(PREFIX + "broker", system=True, shell="/usr/sbin/nologin")
        self.alice = add_user(PREFIX + "alice")
        self.bob = add_user(PREFIX + "bob", groups=[PREFIX + "science"])
        self.carol = add_user(PREFIX + "carol")
        self.denied = add_user(PREFIX + "denied")
        self.ingroup = add_user(PREFIX + "ingroup", groups=[PREFIX + "denygrp"])
        self.system = add_user(PREFIX + "sys", system=True)  # uid below 1000
        self.badshell = add_user(PREFIX + "badshell", shell="/usr/sbin/nologin")
        # a second name for alice's uid: getpwuid(uid) gives "mept-alice", not this name
        self.alias = add_user(PREFIX + "alias", uid=self.alice.pw_uid, non_unique=True)
        self.nobody = pwd.getpwnam("nobody")


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
    """/run/mept-XXXX: root-owned 0755, holding the probe, the key, policies and logs."""

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
        # a copy of the unprivileged packages that a launched test broker may import
        self.lib = self.path / "lib"
        for package in ("protocol", "privhelper", "broker", "localservice"):
            shutil.copytree(ROOT / package, self.lib / package, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(ROOT / "systemd", self.path / "systemd")  # the unit templates, beside lib/ as in a checkout
        shutil.copyfile(ROOT / "tests" / "testbroker.py", self.path / "testbroker.py")
        global CODE_DIR
        CODE_DIR = self.lib
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


def pam_service(name: str, text: str) -> str:
    """Install /etc/pam.d/mept-NAME; returns the service name."""
    service = PREFIX + name
    path = PAM_DIR / service
    path.write_text(text)
    os.chmod(path, 0o644)
    return service


# -- the helper -------------------------------------------------------------------------

CODE_DIR = ROOT  # RigDir points it at its root-owned copy of the checkout's packages


def helper_cmd(policy: Path, *mode: str) -> list:
    """The helper as mep-privhelper runs it: python3 -I -S, only its own code on sys.path."""
    from privhelper.__main__ import isolated_argv
    return isolated_argv(PYTHON, str(CODE_DIR), ["--policy", str(policy), *mode])


class Helper:
    """A helper process serving one end of a socketpair; the test holds the other."""

    def __init__(self, policy: Path, log_dir: Path):
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.log_path = log_dir / f"helper-{secrets.token_hex(4)}.log"
        self.log = open(self.log_path, "w+")
        self.proc = subprocess.Popen(helper_cmd(policy, "--fd", str(theirs.fileno())), pass_fds=[theirs.fileno()],
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


def reap(proc: subprocess.Popen, timeout: float) -> int:
    """Wait for `proc`; KILL it if it has not ended within `timeout` seconds."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


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
    deadline = time.monotonic() + timeout
    buf = b""
    os.set_blocking(fd, False)
    while b"\n" not in buf:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no report from the probe within {timeout}s (got {buf[:200]!r})")
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            time.sleep(0.01)
            continue
        if not chunk:
            raise EOFError(f"audit pipe closed without a report (got {buf[:200]!r})")
        buf += chunk
    line, _, rest = buf.partition(b"\n")
    return json.loads(line)


def wait_for_child(parent: int, timeout=10.0, running: str | None = None) -> int:
    """The pid of a child of `parent` (one whose command line holds `running`, if given)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{parent}/task/{parent}/children") as f:
            for child in map(int, f.read().split()):
                try:
                    with open(f"/proc/{child}/cmdline", "rb") as c:
                        if running is None or running.encode() in c.read():
                            return child
                except FileNotFoundError:
                    pass
        time.sleep(0.01)
    raise AssertionError(f"process {parent} started no child {running or ''} within {timeout}s")


@contextlib.contextmanager
def strace_holding(pid: int, syscall: str, inject: str):
    """strace attached to `pid`, holding it in `syscall` as `inject` says (strace's
    `-e inject=SYSCALL:INJECT`, e.g. "delay_exit=2000000"); entered once it is attached."""
    tracer = subprocess.Popen(["strace", "-qq", "-o", "/dev/null", "-p", str(pid), "-e", f"trace={syscall}",
                               "-e", f"inject={syscall}:{inject}"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while proc_status_field(pid, "TracerPid") != str(tracer.pid):
            if tracer.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"strace did not attach to {pid}: {tracer.stderr.read() if tracer.poll() else ''}")
            time.sleep(0.01)
        yield
    finally:
        tracer.terminate()
        tracer.wait(10)


def proc_status_field(pid: int, name: str) -> str:
    with open(f"/proc/{pid}/status") as f:
        return next(line.split(":", 1)[1].strip() for line in f if line.startswith(name + ":"))


def proc_state(pid: int) -> str:
    """The state letter of /proc/PID/stat (R, S, t for a traced stop, Z...)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_for(predicate, timeout=15.0, interval=0.05, what="condition"):
    """The test suite's one wait: `predicate()`'s first true value, or AssertionError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (value := predicate()):
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def wait_gone(pids, timeout=10.0) -> list:
    """The pids of `pids` still alive after up to `timeout` s (empty once all are gone)."""
    try:
        wait_for(lambda: not any(alive(p) for p in pids), timeout, what=f"processes {list(pids)} to end")
    except AssertionError:
        pass
    return [p for p in pids if alive(p)]


def port_free(port: int) -> bool:
    """Nothing listens on 127.0.0.1:`port` (the local service's 5000, Slurm's 6817/6818)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def processes_of(user: str) -> list:
    out = run("pgrep", "-u", user, check=False).stdout.split()
    return [int(p) for p in out if alive(int(p))]


def kill_all(pids, sig=signal.SIGKILL) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


if __name__ == "__main__":  # `python -m tests.rig cleanup`
    if sys.argv[1:] == ["cleanup"]:
        cleanup()
