"""Processes as the kernel shows them: the test suite's one `wait_for`, one `alive`, and
what is built on them (/proc fields, children, strace holds, ports, reaping).

The rigs wait through `wait_for` (a deadline and a poll); the one other wait is
tests/rigs/mep.py's `_get`, which polls a RabbitMQ queue on one open connection.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time


def run(*cmd, check=True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def wait_for(predicate, timeout=15.0, interval=0.05, what="condition"):
    """The test suite's one wait: `predicate()`'s first true value, or AssertionError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (value := predicate()):
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def proc_status_field(pid: int, name: str) -> str:
    with open(f"/proc/{pid}/status") as f:
        return next(line.split(":", 1)[1].strip() for line in f if line.startswith(name + ":"))


def proc_state(pid: int) -> str:
    """The state letter of /proc/PID/stat (R, S, t for a traced stop, Z...)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie: a process that has ended but is not
    yet reaped has done all it will do (os.kill(pid, 0) would still say it runs)."""
    try:
        return proc_state(pid) != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pids, timeout=10.0) -> list:
    """The pids of `pids` still alive after up to `timeout` s (empty once all are gone)."""
    try:
        wait_for(lambda: not any(alive(p) for p in pids), timeout, what=f"processes {list(pids)} to end")
    except AssertionError:
        pass
    return [p for p in pids if alive(p)]


def processes_of(user: str) -> list:
    out = run("pgrep", "-u", user, check=False).stdout.split()
    return [int(p) for p in out if alive(int(p))]


def kill_all(pids, sig=signal.SIGKILL) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def reap(proc: subprocess.Popen, timeout: float) -> int:
    """Wait for `proc`; KILL it if it has not ended within `timeout` seconds."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def wait_for_child(parent: int, timeout=10.0, running: str | None = None) -> int:
    """The pid of a child of `parent` (one whose command line holds `running`, if given)."""
    def child():
        with open(f"/proc/{parent}/task/{parent}/children") as f:
            for pid in map(int, f.read().split()):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as c:
                        if running is None or running.encode() in c.read():
                            return pid
                except FileNotFoundError:
                    pass
        return None
    return wait_for(child, timeout, 0.01, what=f"a child {running or ''} of process {parent}")


@contextlib.contextmanager
def strace_holding(pid: int, syscall: str, inject: str, follow: bool = False):
    """strace attached to `pid`, holding it in `syscall` as `inject` says (strace's
    `-e inject=SYSCALL:INJECT`, e.g. "delay_exit=2000000", or "retval=0": the call returns 0
    without running); with `follow`, also every process it forks from then on (strace -f).
    Entered once it is attached."""
    tracer = subprocess.Popen(["strace", *(["-f"] if follow else []), "-qq", "-o", "/dev/null", "-p", str(pid),
                               "-e", f"trace={syscall}",
                               "-e", f"inject={syscall}:{inject}"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: tracer.poll() is not None or proc_status_field(pid, "TracerPid") == str(tracer.pid), 10, 0.01,
                 what=f"strace to attach to {pid}")
        if tracer.poll() is not None:
            raise AssertionError(f"strace did not attach to {pid}: {tracer.stderr.read()}")
        yield
    finally:
        tracer.terminate()
        tracer.wait(10)


def port_free(port: int) -> bool:
    """Nothing listens on 127.0.0.1:`port` (the local service's 5000, Slurm's 6817/6818)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False
