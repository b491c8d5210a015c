"""The helper's loop: one authenticated broker connection, a fixed table of requests.

    state        allowed input                       anything else
    await-hello  hello (within io_timeout)           fatal
    ready        spawn, signal, ping, title          fatal
    (any)        a frame started must finish within io_timeout, else fatal

Fatal: log why, close the connection, stop every UEP, let PAM sessions close, exit.
"""

import fcntl
import os
import select
import signal
import socket
import time

from protocol.errors import ProtocolError
from protocol.session import CLOSED, NEED_DATA, HelperSession
from protocol.messages import MAX_REASON, Exited, Hello, Ping, Pong, Refused, Signal, Signaled, Spawn, Spawned, Title
from privhelper import child, linux, log
from privhelper.authorize import Refusal, authorize

_STOPS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)


class Fatal(Exception):
    pass


class SessionProcess:
    """The helper's record of one session process and the UEP it starts."""

    def __init__(self, pid: int, req: str, name: str, account, status_fd: int, broker_fds: list, channels: tuple):
        self.pid, self.req, self.name, self.account, self.status_fd = pid, req, name, account, status_fd
        self.broker_fds, self.channels, self.buf, self.uep_pid, self.answered, self.exit_code = \
            broker_fds, channels, b"", None, False, None


class Monitor:
    def __init__(self, conn: socket.socket, policy, key: bytes, broker_pid: int | None = None):
        self.conn, self.policy, self.broker_pid = conn, policy, broker_pid
        self.broker_status = 0  # launch mode: how the broker ended, which becomes the helper's exit code
        self.stopping = False  # launch mode: a stop signal was passed on to the broker
        self.title = ""  # the MEP's process title, once the broker has said its endpoint id
        self.session = HelperSession(key, max_frame=policy.max_frame, pam=policy.pam.service if policy.pam.enabled else "")
        self.children: dict[int, SessionProcess] = {}  # by session pid
        self.by_fd: dict[int, SessionProcess] = {}  # by status pipe fd
        self.poller, self.deadline = select.poll(), None
        self.handlers = {Spawn: self.do_spawn, Signal: self.do_signal, Ping: lambda msg: self.send(Pong(msg.req)),
                         Title: self.do_title}


    def run(self) -> int:
        self.wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        for sig in (signal.SIGCHLD, *_STOPS, signal.SIGHUP):
            signal.signal(sig, lambda *_: None)  # the wakeup fd carries the news
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        self.conn.settimeout(self.policy.io_timeout_seconds)  # bounds sends to a stuck broker
        self.poller.register(self.conn.fileno(), select.POLLIN)
        self.poller.register(self.wake_r, select.POLLIN)
        try:
            self.conn.sendall(self.session.challenge())
            self.deadline = time.monotonic() + self.policy.io_timeout_seconds  # for the hello
            while self.step():
                pass
            reason, code = "broker closed the connection", 0
            self.await_broker(2.0)  # it exits on its own now; a TERM in its teardown would hide its exit code
        except (Fatal, ProtocolError, OSError) as e:
            reason, code = f"{type(e).__name__}: {e}", 2
        except Exception as e:  # noqa: BLE001 - fatal on anything unexpected, but clean up first
            import traceback  # only now: the helper never loads it otherwise
            log.error("unexpected error\n%s", traceback.format_exc().rstrip())
            reason, code = f"{type(e).__name__}: {e}", 3
        (log.info if code == 0 else log.error)("ending: %s", reason)
        self.shutdown()
        if code == 0 and os.WIFEXITED(self.broker_status):  # a broker that could not start: the init system must see it
            code = os.WEXITSTATUS(self.broker_status)  # (a signal may be our own TERM of a broker on its way out)
        return code

    def step(self) -> bool:
        timeout = None if self.deadline is None else max(0, self.deadline - time.monotonic())
        for fd, _ in self.poller.poll(None if timeout is None else int(timeout * 1000) + 1):
            if fd == self.conn.fileno():
                if not self.read_conn():
                    return False
            elif fd == self.wake_r:
                self.read_signals()
            elif fd in self.by_fd:
                self.read_status(self.by_fd[fd])
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise Fatal(f"no complete {'hello' if self.session.state == 'await-hello' else 'frame'} within {self.policy.io_timeout_seconds}s")
        return True

    def read_conn(self) -> bool:
        self.session.receive_data(self.conn.recv(65536))
        completed = False
        while (event := self.session.next_event()) is not NEED_DATA:
            if event is CLOSED:
                return False
            completed = True
            if not isinstance(event, Hello):  # the session checked the hello; it is "ready" now
                self.handlers[type(event)](event)  # the session lets only requests through
        if self.session.state != "await-hello":  # the hello deadline stays as set at start
            if not self.session.partial:
                self.deadline = None
            elif completed or self.deadline is None:  # a new frame began: it has io_timeout to finish
                self.deadline = time.monotonic() + self.policy.io_timeout_seconds
        return True

    def send(self, event, fds=()) -> None:
        data = self.session.send(event)
        sent = socket.send_fds(self.conn, [data], list(fds)) if fds else 0
        self.conn.sendall(data[sent:])

    def refuse(self, req, code, reason, who="-") -> None:
        log.warning("refused req=%s user=%s code=%s: %s", req, who, code, reason)
        self.send(Refused(req, code, reason[:MAX_REASON]))  # the broker would refuse a longer one


    def do_signal(self, msg: Signal) -> None:
        target = next((c for c in self.children.values() if c.uep_pid == msg.pid and c.exit_code is None), None)
        if target is None:
            return self.refuse(msg.req, "not-our-child", f"pid {msg.pid} is not a running UEP started by this helper")
        try:
            os.killpg(msg.pid, signal.Signals["SIG" + msg.signal])  # one of protocol's SIGNALS
        except ProcessLookupError:  # it exited; its session process has not reported that yet
            return self.refuse(msg.req, "already-exited", f"UEP {msg.pid} of {target.account.name} has already exited")
        log.info("signal %s to UEP group %d of %s", msg.signal, msg.pid, target.account.name)
        self.send(Signaled(msg.req, msg.pid))

    def do_title(self, msg: Title) -> None:
        self.title = f"Globus Compute Endpoint *({msg.endpoint_id}, {msg.name})"
        linux.set_title(f"{self.title} [root helper]")
        self.send(Pong(msg.req))

    def do_spawn(self, msg: Spawn) -> None:
        live = list(self.children.values())
        try:
            account = authorize(msg, self.policy, len(live), lambda uid: sum(c.account.uid == uid for c in live))
        except Refusal as r:
            return self.refuse(msg.req, r.code, r.reason, msg.username)
        child_fds, broker_fds, status = {}, [], ()
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        try:  # out of fds, memory or processes: this spawn fails, the others go on
            make_channels(msg, child_fds, broker_fds)
            status = status_r, status_w = os.pipe2(os.O_CLOEXEC)
            pid = os.fork()
        except OSError as e:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            for fd in [*child_fds.values(), *broker_fds, *status]:
                os.close(fd)
            return self.refuse(msg.req, "helper-resources", f"cannot start a session process: {e}", account.name)
        if pid == 0:  # the session process
            signal.set_wakeup_fd(-1)
            child.reset_signals(unblock=False)  # session_process unblocks once its handlers are set
            for fd in [status_r, self.conn.fileno(), self.wake_r, *broker_fds, *self.by_fd]:
                os.close(fd)
            child.session_process(account=account, req=msg, policy=self.policy, child_fds=child_fds,
                                  status_w=status_w, helper_pid=os.getppid(), title=self.title)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        for fd in [status_w, *child_fds.values()]:
            os.close(fd)
        self.children[pid] = self.by_fd[status_r] = SessionProcess(pid, msg.req, msg.name, account, status_r, broker_fds, msg.channels)
        self.poller.register(status_r, select.POLLIN)
        log.info("session process %d for req=%s user=%s uid=%d name=%s", pid, msg.req, account.name, account.uid, msg.name)


    def read_status(self, rec: SessionProcess) -> None:
        """The session process writes whole short lines (atomic on a pipe); read them."""
        if not (data := os.read(rec.status_fd, 4096)):
            self.poller.unregister(rec.status_fd)
            del self.by_fd[rec.status_fd]
            os.close(rec.status_fd)
            rec.status_fd = None
            return
        rec.buf += data
        while b"\n" in rec.buf:
            line, rec.buf = rec.buf.split(b"\n", 1)
            self.handle_status(rec, line.decode("utf-8", "replace"))

    def handle_status(self, rec: SessionProcess, line: str) -> None:
        word, _, rest = line.partition(" ")
        if word == "ok" and not rec.answered:
            rec.uep_pid, rec.answered = int(rest), True
            log.info("Creating new user endpoint (pid: %d) [(%s, %s) %s] req=%s uid=%d", rec.uep_pid, rec.account.name,
                     rec.name, " ".join(rec.name if a == "{name}" else a for a in self.policy.uep_argv), rec.req,
                     rec.account.uid)  # upstream's line, with the argv only the policy knows
            self.send(Spawned(rec.req, rec.uep_pid, rec.channels), rec.broker_fds)
            self._close_broker_fds(rec)
        elif word == "refused" and not rec.answered:
            rec.answered = True
            code, _, reason = rest.partition(" ")
            self._close_broker_fds(rec)
            self.refuse(rec.req, code, reason, rec.account.name)
        elif word == "exit" and rec.uep_pid is not None:
            rec.exit_code = max(-64, min(255, int(rest)))
        else:
            raise Fatal(f"session process {rec.pid} sent an unexpected line {line[:80]!r}")

    def _close_broker_fds(self, rec: SessionProcess) -> None:
        for fd in rec.broker_fds:
            os.close(fd)
        rec.broker_fds = []

    def read_signals(self) -> None:
        """Served alone (socket activation), a stop or a HUP ends the helper. In launch mode
        the administrator sees this pid as the MEP's (the seed: Ctrl+C, Ctrl+\\, SIGTERM stop
        it, SIGHUP hot-restarts it), so the broker is asked to do it: TERM for a clean stop
        (notices, each UEP's grace, the audit sentinel), HUP for a re-exec that keeps every
        UEP. A second stop while the broker stops is the administrator insisting: fatal."""
        signums = os.read(self.wake_r, 256)
        for signum in signums:
            if signum not in (*_STOPS, signal.SIGHUP):
                continue
            if self.broker_pid is None or (signum in _STOPS and self.stopping):
                raise Fatal(f"{signal.Signals(signum).name} received")
            self.stopping = self.stopping or signum in _STOPS
            forward = signal.SIGHUP if signum == signal.SIGHUP else signal.SIGTERM
            log.info("%s received: %s to the broker (%d)", signal.Signals(signum).name, forward.name, self.broker_pid)
            child.kill(self.broker_pid, forward)
        if signal.SIGCHLD in signums:
            self.reap()

    def reap(self) -> None:
        while self.children or self.broker_pid:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                return
            elif pid == self.broker_pid:
                log.info("broker process %d exited (%s)", pid, _describe(status))
                self.broker_pid, self.broker_status = None, status
            elif rec := self.children.pop(pid, None):
                self.finish(rec, status)

    def finish(self, rec: SessionProcess, status: int) -> None:
        while rec.status_fd is not None:  # the writer is gone: drain to EOF
            self.read_status(rec)
        if not rec.answered:
            self._close_broker_fds(rec)
            self.refuse(rec.req, "internal", f"the session process ended before the UEP started ({_describe(status)}); "
                        "see the helper log", rec.account.name)
        elif rec.uep_pid is not None:
            code = rec.exit_code if rec.exit_code is not None else -signal.SIGKILL
            log.info("exited pid=%d status=%d [(%s, %s)]", rec.uep_pid, code, rec.account.name, rec.name)
            self.send(Exited(rec.uep_pid, code))

    def await_broker(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while self.broker_pid is not None and time.monotonic() < deadline:
            pid, status = os.waitpid(self.broker_pid, os.WNOHANG)
            if pid:
                self.broker_pid, self.broker_status = None, status
            else:
                time.sleep(0.02)

    def shutdown(self) -> None:
        """TERM every session process (each stops its UEP, closes PAM) and the broker; KILL stragglers; reap."""
        self.conn.close()
        for pid in [*self.children, self.broker_pid]:
            child.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.policy.stop_grace_seconds + 5
        while self.children or self.broker_pid is not None:
            if time.monotonic() > deadline:
                log.error("killing session processes %s and their UEP groups: they did not stop", list(self.children))
                for rec in self.children.values():
                    child.kill(rec.pid, signal.SIGKILL)
                    child.kill(-rec.uep_pid if rec.uep_pid else None, signal.SIGKILL)
                child.kill(self.broker_pid, signal.SIGKILL)
                deadline = float("inf")
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                time.sleep(0.02)
            self.children.pop(pid, None)
            if pid == self.broker_pid:
                self.broker_pid, self.broker_status = None, status


def make_channels(msg: Spawn, child_fds: dict, broker_fds: list) -> None:
    """stdin: sealed read-only memfd; cred: memfd, broker writes, UEP reads; audit: packet pipe, the reverse.
    Every fd is in `child_fds` or `broker_fds` as soon as it exists, so a failure half-way leaks none."""
    broker_fds.append(stdin := os.memfd_create("mep-stdin", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING))  # until closed below
    if os.write(stdin, msg.stdin) != len(msg.stdin):
        raise OSError(f"short write of the UEP's stdin ({len(msg.stdin)} bytes)")
    fcntl.fcntl(stdin, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE)
    child_fds["stdin"] = _child_end(stdin)
    os.close(broker_fds.pop())
    if "cred" in msg.channels:
        broker_fds.append(cred := os.memfd_create("mep-cred", os.MFD_CLOEXEC))
        child_fds["cred"] = _child_end(cred)
    if "audit" in msg.channels:
        audit_r, audit_w = os.pipe2(os.O_CLOEXEC | os.O_DIRECT)  # packets: one record per read
        broker_fds.append(audit_r)
        child_fds["audit"] = audit_w


def _child_end(fd: int) -> int:
    """A read-only reopen of memfd `fd` for the UEP; mode 0400 stops it reopening for writing (root-code.md)."""
    os.fchmod(fd, 0o400)
    return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit code {os.waitstatus_to_exitcode(status)}"
