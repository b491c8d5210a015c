"""privhelper.child's fork, drop and exec (and launch mode's start_broker, which uses them),
called directly (no helper, no test users): the child becomes Debian's `daemon` (uid 1) or
`nobody`, execs the system python, and reports what the kernel says about it. The same checks through the real helper, with real test
accounts and PAM: tests/test_child.py. Root (it drops privileges), but no lock: it makes no users."""

import json
import os
import pwd
import signal

import pytest

from privhelper import child
from privhelper.authorize import Account

pytestmark = [pytest.mark.root]

REPORT = r"""
import ctypes, json, os, signal, sys
libc = ctypes.CDLL("libc.so.6")
status = dict(l.split(":\t", 1) for l in open("/proc/self/status").read().splitlines() if ":\t" in l)
print(json.dumps({
    "argv": sys.argv[1:], "env": dict(os.environ), "resuid": os.getresuid(), "resgid": os.getresgid(),
    "groups": sorted(os.getgroups()), "caps": {k: status[k].strip() for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")},
    "nnp": status["NoNewPrivs"].strip(), "sigign": status["SigIgn"].strip(), "sigblk": status["SigBlk"].strip(),
    "pdeathsig": (lambda v: (libc.prctl(2, ctypes.byref(v), 0, 0, 0), v.value)[1])(ctypes.c_int()),
    "sid": os.getsid(0), "pgid": os.getpgid(0), "pid": os.getpid(), "cwd": os.getcwd(),
    "umask": (lambda m: (os.umask(m), m)[1])(os.umask(0)), "fds": sorted(int(f) for f in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{f}")),
    "fd3": os.read(3, 100).decode() if os.path.exists("/proc/self/fd/3") else None,
    "fd4": os.read(4, 100).decode() if os.path.exists("/proc/self/fd/4") else None,
}), flush=True)
"""


def run_child(pw, *, argv_extra=(), env=None, no_new_privs=True, extra_fd=True, ignore_term=False):
    account = Account.of(pw)
    out_r, out_w = os.pipe()
    plan = {0: os.open("/dev/null", os.O_RDONLY), 1: out_w, 2: out_w}
    if extra_fd:
        for fd, text in ((3, b"channel"), (4, b"audit")):
            r, w = os.pipe()
            os.write(w, text)
            os.close(w)
            plan[fd] = r
    stray = os.open("/dev/null", os.O_RDONLY)  # inheritable and not in the plan: must not reach the child
    os.set_inheritable(stray, True)
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, ())
    old_term = signal.signal(signal.SIGTERM, signal.SIG_IGN if ignore_term else signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    try:
        pid, failure = child.fork_exec(account, ("/usr/bin/python3", "-I", "-c", REPORT, *argv_extra),
                                       env if env is not None else {"A": "b", "LC_ALL": "C.UTF-8"}, plan, no_new_privs)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)  # fork_exec leaves the stops blocked for _wait_uep
        signal.signal(signal.SIGTERM, old_term)
        for fd in {*plan.values(), stray}:
            os.close(fd)
    with os.fdopen(out_r) as f:
        text = f.read()
    if not failure:
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, text
    return pid, failure, (json.loads(text) if text and not failure else None)


PYTHON_IGNORES = 1 << (signal.SIGPIPE - 1) | 1 << (signal.SIGXFSZ - 1)  # what python itself ignores at start
DAEMON, NOBODY = pwd.getpwnam("daemon"), pwd.getpwnam("nobody")


def test_the_child_is_the_user_with_nothing_left():
    pid, failure, r = run_child(DAEMON, argv_extra=("x", "{name}"))
    assert failure is None
    assert r["argv"] == ["x", "{name}"] and r["env"] == {"A": "b", "LC_ALL": "C.UTF-8"}  # execve: exactly the env given
    assert r["resuid"] == [1, 1, 1] and r["resgid"] == [1, 1, 1] and r["groups"] == [1]
    assert r["caps"] == dict.fromkeys(("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"), "0000000000000000")
    assert r["nnp"] == "1" and r["pdeathsig"] == signal.SIGKILL
    assert r["sid"] == r["pgid"] == r["pid"] == pid  # its own session and process group: killpg reaches all of it
    assert r["cwd"] == DAEMON.pw_dir and r["umask"] == 0o077
    assert r["fds"] == [0, 1, 2, 3, 4] and (r["fd3"], r["fd4"]) == ("channel", "audit")  # the plan, nothing else
    assert int(r["sigblk"], 16) == 0  # the mask is reset (SIGUSR1 and the stops were blocked in the parent)
    assert int(r["sigign"], 16) == PYTHON_IGNORES


def test_no_new_privs_is_what_the_caller_says():
    assert run_child(DAEMON, no_new_privs=False)[2]["nnp"] == "0"


def test_an_ignored_signal_is_not_inherited():
    assert int(run_child(DAEMON, ignore_term=True)[2]["sigign"], 16) == PYTHON_IGNORES


def test_home_that_does_not_exist_means_root_dir():
    r = run_child(NOBODY, extra_fd=False)[2]
    assert r["cwd"] == "/" and r["fds"] == [0, 1, 2] and r["fd3"] is None
    assert r["resuid"] == [65534] * 3


def test_exec_failure_is_reported_and_reaped():
    """The failed child reports on the error pipe and _exits: it must never return into the caller's code."""
    account = Account.of(DAEMON)
    me, (out_r, out_w) = os.getpid(), os.pipe()
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, ())
    try:
        pid, failure = child.fork_exec(account, ("/nonexistent/uep", "x"), {}, {0: os.open("/dev/null", os.O_RDONLY), 1: out_w}, True)
        if os.getpid() != me:  # only a child that returned from exec_child gets here: say so on its stdout and stop
            os.write(1, b"returned")
            os._exit(0)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    os.close(out_w)
    with os.fdopen(out_r, "rb") as f:
        assert f.read() == b""
    assert failure == "exec-failed cannot exec /nonexistent/uep: No such file or directory"
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # already reaped


def test_kill_ignores_a_pid_that_is_gone():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    child.kill(pid, signal.SIGTERM)
    child.kill(None, signal.SIGTERM)
    child.kill(0, signal.SIGCONT)  # 0 means "no pid", never "my own process group"


def test_prctl_errors_carry_errno():
    from privhelper import linux
    with pytest.raises(OSError) as info:
        linux.prctl(987654)
    assert info.value.errno == 22 and "prctl(987654, 0): Invalid argument" in str(info.value)
    assert linux.prctl(linux.PR_GET_NO_NEW_PRIVS) in (0, 1)
    assert linux.proc_status()["Uid"].split() == ["0", "0", "0", "0"]


# what launch mode passes from the helper's environment to the broker (docs/policy.md), written out
# here so that a change to privhelper/policy.py BROKER_ENV shows
BROKER_ENV = ("HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY", "https_proxy", "http_proxy", "no_proxy", "TERM", "REQUESTS_CA_BUNDLE",
              "SSL_CERT_FILE", "SSL_CERT_DIR", "GLOBUS_COMPUTE_CLIENT_ID", "GLOBUS_COMPUTE_CLIENT_SECRET")


def test_launch_mode_gives_the_broker_exactly_the_documented_environment(monkeypatch):
    """`mepctl start`: of the helper's environment only BROKER_ENV and GLOBUS_SDK_* reach the broker,
    which runs as its account (here Debian's `daemon`) with the socket's end as fd 3."""
    from privhelper import launch
    from privhelper.policy import Policy
    for name in BROKER_ENV:
        monkeypatch.setenv(name, f"v-{name}")
    for name in ("GLOBUS_SDK_ENVIRONMENT", "GLOBUS_SDK", "HTTPS_PROXY_X", "XTERM", "MEP_ROOT_ONLY"):
        monkeypatch.setenv(name, "x")
    policy = Policy(path="/etc/mep/policy.toml", broker_user="daemon", broker_uid=1, key_file="/etc/mep/key",
                    uep_argv=("/usr/bin/true", "{name}"), broker_argv=(
                        "/usr/bin/python3", "-I", "-c", "import json, os; os.write(3, json.dumps(dict(os.environ)).encode())"))
    ours, pid = launch.start_broker(policy)
    with ours, ours.makefile("rb") as f:
        env = json.loads(f.read())
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    assert env == {"HOME": DAEMON.pw_dir, "USER": "daemon", "LOGNAME": "daemon", "SHELL": DAEMON.pw_shell, "PATH": policy.path_env,
                   "LANG": policy.lang, "MEP_HELPER_FD": "3", "GLOBUS_SDK_ENVIRONMENT": "x", **{n: f"v-{n}" for n in BROKER_ENV}}


def test_the_documented_broker_environment():
    import re
    from pathlib import Path
    from privhelper.policy import BROKER_ENV as CODE
    documented = Path(__file__).resolve().parent.parent.joinpath("docs", "policy.md").read_text()
    table = documented.split("these (privhelper/policy.py `BROKER_ENV`", 1)[1].split("\n\n", 2)[1]
    assert sorted(re.findall(r"`([A-Za-z_]+)`", table)) == sorted(CODE) == sorted(BROKER_ENV)
