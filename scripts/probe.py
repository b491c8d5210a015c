#!/usr/bin/python3 -I
"""A stand-in UEP that reports what it sees from the inside, for tests, demo and bench.

Writes one JSON line to $PROBE_REPORT_DIR/PID.jsonl if set, else to fd 4 (the audit pipe)
when that is open, else to stdout: ids,
groups, capabilities, NoNewPrivs, open fds, session, umask, cwd, environment, argv, the
stdin payload and the credential memfd. Then it acts on $PROBE_ACTION or else the stdin
payload, a JSON object:
{"sleep": seconds, "exit": code, "grandchild": true (fork a child that sleeps too),
"cred_wait": seconds (wait for the credential memfd to change and report it again),
"escape": true (a setsid'd, double-forked descendant outside the UEP's group reports its pid),
"run": [argv] (run a program, e.g. a setuid one, and report its exit code and output)}.
Stdlib only; it is exec'd directly as the UEP program of a test policy.
"""

import json
import os
import sys
import time

start = time.monotonic_ns()


def status() -> dict:
    with open("/proc/self/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def read_fd(fd: int, limit: int = 1 << 20) -> str | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
    except OSError:
        pass
    try:
        return os.read(fd, limit).decode("utf-8", "replace")
    except OSError:
        return None


def report() -> dict:
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[name] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass  # the fd of the listdir itself, already closed
    umask = os.umask(0)
    os.umask(umask)
    st = status()
    try:
        os.setuid(0)
        setuid0 = "succeeded"
    except PermissionError as e:
        setuid0 = f"failed: {e.strerror}"
    reopen = {}
    for fd in (0, 3):  # the memfds: can this process get a writable handle on them?
        try:
            os.close(os.open(f"/proc/self/fd/{fd}", os.O_WRONLY))
            reopen[fd] = "opened for writing"
        except OSError as e:
            reopen[fd] = e.strerror
    with open("/proc/self/limits") as f:
        nofile = next(line.split()[3] for line in f if line.startswith("Max open files"))
    return {
        "pid": os.getpid(), "ppid": os.getppid(), "sid": os.getsid(0), "pgid": os.getpgid(0),
        "resuid": os.getresuid(), "resgid": os.getresgid(), "groups": sorted(os.getgroups()),
        "caps": {k: st[k] for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")},
        "signals": {k: st[k] for k in ("SigBlk", "SigIgn")},
        "no_new_privs": int(st["NoNewPrivs"]), "setuid0": setuid0, "umask": umask,
        "cwd": os.getcwd(), "env": dict(os.environ), "argv": sys.argv, "fds": fds,
        "nofile_soft": nofile, "started_ns": start, "reopen_write": reopen,
    }


def emit(record: dict) -> None:
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    if report_dir := os.environ.get("PROBE_REPORT_DIR"):  # as the UEP of a broker test
        with open(os.path.join(report_dir, f"{os.getpid()}.jsonl"), "ab") as f:
            f.write(line)
        return
    try:
        os.write(4, line)
    except OSError:
        os.write(1, line)


def main() -> int:
    record = report()
    stdin = read_fd(0) or ""
    record["stdin"] = stdin
    record["cred"] = read_fd(3) if os.path.exists("/proc/self/fd/3") else None
    emit(record)
    try:  # PROBE_ACTION when stdin is a real UEP document (broker tests)
        action = json.loads(os.environ.get("PROBE_ACTION") or stdin or "{}")
    except ValueError:
        action = {}
    if action.get("escape") and os.fork() == 0:  # leave the UEP's group and session, and its tree
        os.setsid()
        if os.fork() == 0:
            emit({"escaped": os.getpid(), "sid": os.getsid(0)})
            time.sleep(120)
        os._exit(0)
    if action.get("run"):
        import subprocess
        done = subprocess.run(action["run"], capture_output=True, text=True)
        emit({"pid": os.getpid(), "run": {"returncode": done.returncode, "stdout": done.stdout, "stderr": done.stderr}})
    if action.get("grandchild") and os.fork() == 0:
        time.sleep(action.get("sleep", 0))
        os._exit(0)
    if action.get("cred_wait"):
        deadline = time.monotonic() + action["cred_wait"]
        while time.monotonic() < deadline and read_fd(3) == record["cred"]:
            time.sleep(0.05)
        emit({"pid": os.getpid(), "cred": read_fd(3)})
    time.sleep(action.get("sleep", 0))
    return int(action.get("exit", 0))


if __name__ == "__main__":
    sys.exit(main())
