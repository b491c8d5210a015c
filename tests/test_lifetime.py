"""Lifetime (SECURITY-REVIEW 15, 16, 18) and the launch mode: no UEP outlives its MEP,
and the helper only signals its own children."""

import json
import os
import re
import signal
import socket
import subprocess
import time

import pytest

from protocol.messages import Signal, Spawn
from tests.rigs import procs
from tests.rigs.accounts import PAM_DIR, pam_service
from tests.rigs.helper import PYTHON, Client, Launched, read_report

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("no_strays")]


@pytest.fixture
def launch(rigdir):
    started = []

    def start(spawns, **policy):
        launched = Launched(rigdir, spawns, **policy)
        started.append(launched)
        return launched

    yield start
    for launched in started:
        launched.close()


def sleepers(accounts, seconds=60):
    return [{"user": a.pw_name, "uid": a.pw_uid, "stdin": json.dumps({"sleep": seconds, "grandchild": True})}
            for a in (accounts.alice, accounts.bob)]


def test_launch_mode_broker_runs_unprivileged(launch, accounts):
    """The root parent stays the helper; the broker child is the broker account with no
    capabilities and NO_NEW_PRIVS, and reaches the helper on fd 3."""
    mep = launch([])
    broker = mep.broker
    assert broker["uid"] == accounts.broker.pw_uid
    assert broker["env"]["MEP_HELPER_FD"] == "3"
    assert broker["env"]["USER"] == accounts.broker.pw_name
    status = open(f"/proc/{broker['broker_pid']}/status").read()
    assert "NoNewPrivs:\t1" in status
    assert "CapEff:\t0000000000000000" in status and "CapBnd:\t0000000000000000" in status
    assert int(procs.run("ps", "-o", "ppid=", "-p", str(broker["broker_pid"])).stdout) == mep.proc.pid


def test_broker_sigkill_stops_every_uep_and_closes_pam(launch, accounts, rigdir):
    """15: SIGKILL to the broker: the helper sees the connection close, TERMs every UEP
    group (grandchildren included), the session processes close PAM, the helper exits."""
    log = rigdir.path / "pam-lifetime.log"
    hook = rigdir.file("pam-lifetime.sh", f'#!/bin/sh\necho "$PAM_TYPE $PAM_USER" >> {log}\n', mode=0o755)
    service = pam_service("lifetime", f"auth required pam_permit.so\naccount required pam_permit.so\nsession required pam_exec.so {hook}\n")
    mep = launch(sleepers(accounts), pam={"enabled": True, "service": service})
    ueps = [u["pid"] for u in mep.ueps]
    everyone = ueps + procs.processes_of(accounts.alice.pw_name) + procs.processes_of(accounts.bob.pw_name)
    assert len(set(everyone)) == 4  # two UEPs, two grandchildren
    assert sorted(log.read_text().split("\n")[:-1]) == ["open_session mept-alice", "open_session mept-bob"]
    os.kill(mep.broker["broker_pid"], signal.SIGKILL)
    assert procs.wait_gone(everyone, timeout=5) == []
    assert mep.proc.wait(10) == 0
    assert sorted(log.read_text().split("\n")[:-1]) == ["close_session mept-alice", "close_session mept-bob",
                                                        "open_session mept-alice", "open_session mept-bob"]


def test_helper_sigkill_takes_everything_with_it(launch, accounts):
    """16: SIGKILL to the helper: PDEATHSIG takes the broker and the session processes,
    which take their UEP groups."""
    mep = launch(sleepers(accounts))
    sessions = mep.session_pids()
    assert len(sessions) == 2
    everyone = [mep.broker["broker_pid"], *sessions, *procs.processes_of(accounts.alice.pw_name),
                *procs.processes_of(accounts.bob.pw_name)]
    assert len(everyone) == 7
    os.kill(mep.proc.pid, signal.SIGKILL)
    mep.proc.wait()
    assert procs.wait_gone(everyone, timeout=5) == []


def test_signal_only_for_own_children(helpers, accounts):
    """18: pid 1, the test's own pid and the helper's pid are refused; the helper's own
    UEP gets the signal, to its whole process group."""
    helper, client = helpers()
    from protocol.messages import Signal
    for pid in (1, os.getpid(), helper.proc.pid):
        req = client.req_id()
        client.request(Signal(req, pid, "KILL"))
        reply = client.reply(req)
        assert reply.type == "refused" and reply.code == "not-our-child", reply
        assert f"pid {pid} is not a running UEP started by this helper" == reply.reason
    assert procs.alive(helper.proc.pid)
    reply = client.spawn(accounts.alice, stdin=b'{"sleep": 30, "grandchild": true}')
    read_report(reply.fds["audit"])
    group = procs.processes_of(accounts.alice.pw_name)
    assert len(group) == 2
    req = client.req_id()
    client.request(Signal(req, reply.pid, "TERM"))
    assert client.reply(req).type == "signaled"
    assert client.wait_exited(reply.pid).status == -signal.SIGTERM
    assert procs.wait_gone(group) == []
    req = client.req_id()  # and an exited UEP is no longer a target
    client.request(Signal(req, reply.pid, "KILL"))
    assert client.reply(req).code == "not-our-child"


def test_a_descendant_that_left_the_uep_group_dies_with_the_uep(helpers, accounts):
    """21: a setsid'd, double-forked process is outside the UEP's group and session, so
    killing the group misses it; the session process is the UEP's subreaper and KILLs it
    when the UEP exits (upstream leaves such processes running)."""
    helper, client = helpers()
    reply = client.spawn(accounts.alice, stdin=b'{"escape": true, "sleep": 1}')
    uep = read_report(reply.fds["audit"])
    escaped = read_report(reply.fds["audit"])
    assert escaped["sid"] != uep["sid"] and procs.alive(escaped["escaped"])  # outside the UEP's session and group
    assert client.wait_exited(reply.pid).status == 0
    assert procs.wait_gone([escaped["escaped"]], timeout=5) == []
    assert procs.processes_of(accounts.alice.pw_name) == []


def test_closing_the_connection_stops_a_uep_that_ignores_term(helpers, accounts, rigdir):
    """The grace period ends in SIGKILL for the whole group."""
    script = rigdir.file("stubborn", "#!/bin/sh\ntrap '' TERM\necho started >&4\nwhile :; do sleep 0.1; done\n", mode=0o755)
    helper, client = helpers(uep_argv=[str(script), "{name}"], stop_grace_seconds=1)
    reply = client.spawn(accounts.alice)
    assert os.read(reply.fds["audit"], 100) == b"started\n"
    pids = procs.processes_of(accounts.alice.pw_name)
    started = time.monotonic()
    client.sock.close()
    assert helper.wait() == 0
    assert procs.wait_gone(pids, timeout=5) == []
    assert 1 <= time.monotonic() - started < 8


def test_a_stop_that_arrives_while_the_session_process_forks_the_uep_is_not_lost(helpers, accounts, rigdir):
    """strace holds the session process inside the clone() that creates the UEP while the
    helper, told to stop, sends it TERM. Raised there, the stop would be swallowed by
    Python's at-fork hook ("Exception ignored") and the session process would wait for a
    UEP that sleeps 30 s until the helper KILLed it, PAM unclosed; it must stop the UEP."""
    slow = rigdir.file("slow-account.sh", "#!/bin/sh\nsleep 1\n", mode=0o755)
    service = pam_service(f"forkstop-{os.urandom(3).hex()}", f"auth required pam_permit.so\n"
                              f"account required pam_exec.so {slow}\nsession required pam_permit.so\n")
    try:
        helper, client = helpers(pam={"enabled": True, "service": service}, stop_grace_seconds=1)
        client.request(Spawn("t1", accounts.alice.pw_name, accounts.alice.pw_uid, "uep1", {}, b'{"sleep": 30}',
                             ("audit",)))
        session = procs.wait_for_child(helper.proc.pid)  # in PAM's account step for a second
        with procs.strace_holding(session, "clone", "delay_exit=2000000"):
            uep = procs.wait_for_child(session, timeout=10, running=str(rigdir.probe))  # its parent is held in clone()
            assert procs.proc_state(session) == "t", procs.proc_state(session)
            client.sock.close()  # the helper ends: TERM to the session process, which arrives inside clone()
            assert helper.wait(timeout=20) == 0
        log = helper.output()
        assert "did not stop" not in log and "Exception ignored" not in log, log
        assert procs.wait_gone([uep, session], timeout=5) == []
    finally:
        (PAM_DIR / service).unlink(missing_ok=True)


def test_an_unexpected_error_is_logged_with_its_traceback_and_still_stops_every_uep(rigdir, accounts):
    """Fatal on anything unexpected, but clean up first: a bug (here a handler made to
    raise) ends the helper with exit code 3, its traceback in the log, and the UEP that
    was running stopped like on any other fatal error."""
    policy = rigdir.policy(stop_grace_seconds=1)
    sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    boot = (f"import sys; sys.path.insert(0, {str(rigdir.lib)!r}); from privhelper import monitor, __main__\n"
            "def broken(self, msg): raise ValueError('injected for the test')\n"
            "monitor.Monitor.do_signal = broken\nsys.exit(__main__.main())")
    proc = subprocess.Popen([PYTHON, "-I", "-S", "-c", boot, "--policy", str(policy), "--fd", str(theirs.fileno())],
                            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    theirs.close()
    try:
        client = Client(sock, rigdir.key)
        client.handshake()
        reply = client.spawn(accounts.alice, stdin=b'{"sleep": 30}')
        assert reply.type == "spawned", reply
        client.request(Signal("t9", reply.pid, "TERM"))
        assert proc.wait(timeout=15) == 3
        log = proc.stderr.read()
        assert re.search(r"mep-privhelper\[\d+\] ERROR unexpected error\nTraceback \(most recent call last\):\n", log), log
        assert "ValueError: injected for the test\n" in log and "ERROR ending: ValueError: injected for the test" in log
        assert procs.wait_gone([reply.pid], timeout=5) == []
        assert procs.processes_of(accounts.alice.pw_name) == []
    finally:
        sock.close()
        procs.reap(proc, 15)


def test_a_log_that_cannot_be_written_does_not_stop_the_helper(rigdir, accounts):
    """stderr gone (journald restarted, say): every log line now fails with EPIPE. The
    helper drops them, as `logging` did, and goes on serving; it must not take every UEP
    down with it."""
    sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    proc = subprocess.Popen(rigdir.helper_cmd(rigdir.policy(), "--fd", str(theirs.fileno())), pass_fds=[theirs.fileno()],
                            stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    theirs.close()
    proc.stderr.close()  # nobody reads the log any more
    try:
        client = Client(sock, rigdir.key)
        client.handshake()
        for i in range(20):  # spawned, exited: two lines each, from the helper and its session processes
            reply = client.spawn(accounts.alice, name=f"uep{i}", channels=("audit",))
            assert reply.type == "spawned", reply
            assert read_report(reply.fds["audit"])["resuid"] == [accounts.alice.pw_uid] * 3
            os.close(reply.fds["audit"])
            assert client.wait_exited(reply.pid).status == 0
        assert proc.poll() is None
        sock.close()
        assert proc.wait(timeout=15) == 0
    finally:
        sock.close()
        procs.reap(proc, 15)


def test_one_uep_exits_while_another_runs(helpers, accounts):
    """The helper reaps the one that ended, reports it, and goes on serving the rest."""
    helper, client = helpers()
    from protocol.messages import Ping
    stays = client.spawn(accounts.bob, stdin=b'{"sleep": 30}')
    goes = client.spawn(accounts.alice, stdin=b'{"sleep": 0}')
    assert stays.type == goes.type == "spawned"
    assert client.wait_exited(goes.pid).status == 0
    req = client.req_id()
    client.request(Ping(req))
    assert client.reply(req).type == "pong"  # still serving, with bob's UEP alive
    assert procs.alive(stays.pid)
