"""Processes killed and services lost under a live MEP (real helper, broker, RabbitMQ, PAM):
what is left afterwards, and that no start command is lost or served twice.

The PAM stack of these tests logs each session open and close (pam_exec), and its
account step can be slowed for one user, so that a spawn is certainly in flight when
the fault hits."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time

import pytest

from tests.rigs import procs
from tests.rigs.procs import wait_for

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.usefixtures("no_strays", "rabbitmq")]
MAX_QUEUES = 300  # above this, a RabbitMQ restart has been seen to hang in queue recovery


def sessions(pam) -> list:
    return pam["log"].read_text().split("\n") if pam["log"].exists() else []


def zombies() -> list:
    out = procs.run("ps", "-eo", "pid=,stat=,user:32=", check=False).stdout.split("\n")
    return [line for line in out if line.split()[1:2] and line.split()[1].startswith("Z")]


def started_lines(mep, name: str) -> int:
    return sum(1 for line in mep.output().splitlines() if "user endpoint started" in line and name in line)


def test_broker_sigkill_with_a_spawn_in_flight(live, accounts, pam):
    """Every UEP gone within 5 s, its PAM session closed, no zombie; the start that was
    in flight is not acked, goes back to the queue, and the next broker serves it once."""
    mep = live(policy=pam["policy"])
    mep.publish(mep.command("mept-alice@example.org"))
    alice_pid = next(iter(wait_for(mep.reports_now, what="alice's UEP")))
    bob = mep.command("mept-bob@example.org")
    mep.publish(bob)
    wait_for(pam["marker"].exists, what="bob's PAM account step to begin")
    zombies_before = len(zombies())
    os.kill(mep.broker_pid(), signal.SIGKILL)
    t0 = time.monotonic()
    assert procs.wait_gone([alice_pid], 5) == [], "alice's UEP outlived the broker by 5 s"
    procs.reap(mep.proc, 10)  # the helper ends once its session processes have
    gone_after = time.monotonic() - t0
    assert gone_after < 5 + 3, f"the helper took {gone_after:.1f} s"  # bob's PAM step may finish its 3 s first
    assert "close_session mept-alice" in sessions(pam)
    assert sessions(pam).count("open_session mept-bob") == sessions(pam).count("close_session mept-bob")
    assert procs.processes_of("mept-alice") == procs.processes_of("mept-bob") == []
    wait_for(lambda: len(zombies()) <= zombies_before, timeout=5, what=f"no zombie left: {zombies()}")
    assert started_lines(mep, bob["kwargs"]["name"]) == 0
    assert mep.queue_depth() == 1  # bob's command: never acked, back in the queue

    mep.relaunch()
    wait_for(lambda: started_lines(mep, bob["kwargs"]["name"]) == 1, timeout=20, what="bob's start after relaunch")
    time.sleep(1)  # a second start, if any, would show now
    assert started_lines(mep, bob["kwargs"]["name"]) == 1 and mep.queue_depth() == 0
    bob_reports = wait_for(lambda: [r for r in mep.reports_now().values() if r[0]["resuid"][0] == accounts.bob.pw_uid],
                           what="bob's probe report")  # it reports a moment after the broker logs the start
    assert len(bob_reports) == 1 and bob_reports[0][0]["argv"][-1] == bob["kwargs"]["name"]
    assert mep.notice(bob, timeout=1) is None  # served, not refused


def test_helper_sigkill_takes_the_broker_and_every_uep(live, accounts, pam):
    """PDEATHSIG: the broker and the session processes follow the helper; each session
    process stops its UEP and closes its PAM session on the way out."""
    mep = live(policy=pam["policy"])
    for user in ("alice", "carol"):
        mep.publish(mep.command(f"mept-{user}@example.org"))
    pids = list(wait_for(lambda: len(r := mep.reports_now()) == 2 and r, what="two UEPs"))
    broker = mep.broker_pid()
    sessions_pids = [int(p) for p in procs.run("pgrep", "-P", str(mep.proc.pid), "-u", "root", check=False).stdout.split()]
    assert len(sessions_pids) == 2
    zombies_before = len(zombies())
    os.kill(mep.proc.pid, signal.SIGKILL)
    procs.reap(mep.proc, 5)
    assert procs.wait_gone([broker, *sessions_pids, *pids], 5) == []
    wait_for(lambda: {"close_session mept-alice", "close_session mept-carol"} <= set(sessions(pam)), timeout=5,
             what="both PAM sessions to close")
    assert procs.processes_of("mept-alice") == procs.processes_of("mept-carol") == []
    assert procs.processes_of(accounts.broker.pw_name) == []
    # the orphans' last parent is init, which reaps them in its own time
    wait_for(lambda: len(zombies()) <= zombies_before, timeout=5, what=f"no zombie left: {zombies()}")


def test_twenty_sighups_while_a_hundred_commands_stream_in(live, accounts):
    mep = live(policy={"max_children_per_user": 60}, environment={"PROBE_ACTION": json.dumps({"sleep": 600})})
    before = [mep.command("mept-carol@example.org")]
    mep.publish(before[0])
    [carol_pid] = wait_for(lambda: list(mep.reports_now()), what="carol's UEP")
    broker = mep.broker_pid()
    commands = [mep.command(f"mept-{('alice', 'bob')[i % 2]}@example.org") for i in range(100)]

    def sighups():
        for _ in range(20):
            time.sleep(0.5)
            os.kill(broker, signal.SIGHUP)
    hupper = threading.Thread(target=sighups)
    hupper.start()
    t0 = time.monotonic()
    for i, cmd in enumerate(commands):  # 100 commands over the same 10 s
        mep.publish(cmd)
        time.sleep(max(0.0, t0 + (i + 1) * 0.1 - time.monotonic()))
    hupper.join()
    wait_for(lambda: len(mep.reports_now()) == 101, timeout=90, what="101 UEPs")
    time.sleep(1)  # a duplicate, if any, would show now
    reports = mep.reports_now()
    assert sorted(r[0]["argv"][-1] for p, r in reports.items() if p != carol_pid) == \
        sorted(c["kwargs"]["name"] for c in commands)  # every command served, none twice
    assert mep.broker_pid() == broker and procs.alive(carol_pid)
    assert all(procs.alive(p) for p in reports)  # every UEP kept running through the re-execs
    reexecs = mep.output().count("broker re-executed in place")
    assert 1 <= reexecs <= 20, reexecs  # SIGHUPs that arrive during a re-exec fold into the next
    assert "user endpoint not started" not in mep.output() and "Traceback" not in mep.output()
    assert mep.queue_depth() == 0


def rabbitmqctl(*args, timeout=120):
    return subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=timeout)


def test_rabbitmq_stopped_for_thirty_seconds(live, accounts, pam):
    """stop_app with a spawn in flight, start_app 30 s later: the broker logs the loss,
    reconnects, loses no command (the unacked one comes back and finds its UEP running),
    and the UEPs keep going."""
    queues = rabbitmqctl("list_queues", "-q", "name").stdout.split()
    assert len(queues) < MAX_QUEUES, f"{len(queues)} queues in RabbitMQ; delete leftovers before a restart test"
    mep = live(policy=pam["policy"], durable=True, environment={"PROBE_ACTION": json.dumps({"sleep": 600})})
    mep.publish(mep.command("mept-alice@example.org"))
    [alice_pid] = wait_for(lambda: list(mep.reports_now()), what="alice's UEP")
    bob = mep.command("mept-bob@example.org")
    pam["hold"].touch()  # bob's spawn waits in PAM until the connection is gone
    mep.publish(bob)
    wait_for(pam["marker"].exists, what="bob's PAM account step to begin")
    try:
        out = rabbitmqctl("stop_app")
        assert out.returncode == 0, out.stderr
        wait_for(lambda: "AMQP connection lost; reconnecting" in mep.output(), timeout=10, what="the loss to be logged")
        pam["release"].touch()
        wait_for(lambda: started_lines(mep, bob["kwargs"]["name"]) == 1, what="bob's UEP, started while AMQP is down")
        time.sleep(10)
        status = mep.mepctl("status")  # the admin socket does not need RabbitMQ
        assert status.returncode == 0 and "AMQP:             reconnecting: lost " in status.stdout, status
        time.sleep(20)
    finally:
        out = rabbitmqctl("start_app")
    assert out.returncode == 0, out.stderr
    wait_for(lambda: "AMQP connection re-established" in mep.output(), timeout=60, what="the reconnect")
    assert "command served but not acknowledged" in mep.output()
    assert "AMQP:             connected" in mep.mepctl("status").stdout
    # each failed attempt is logged with the wait before the next, doubling from 1 s
    waits = [float(w) for w in re.findall(r"retry_in_s=([\d.]+)", mep.output())]
    assert len(waits) >= 5 and waits[:5] == [1.0, 2.0, 4.0, 8.0, 16.0] and max(waits) == 16.0, waits
    wait_for(lambda: mep.queue_depth() == 0 and "credentials refreshed" in mep.output(), timeout=20,
             what="bob's redelivered command to find its UEP running")
    carol = mep.command("mept-carol@example.org")
    mep.publish(carol)
    wait_for(lambda: started_lines(mep, carol["kwargs"]["name"]) == 1, timeout=20, what="a start after the outage")
    assert procs.alive(alice_pid) and mep.proc.poll() is None
    assert started_lines(mep, bob["kwargs"]["name"]) == 1
    wait_for(lambda: len(mep.reports_now()) == 3, what="one report each from alice's, bob's and carol's UEP")


def test_a_sighup_during_the_re_exec_itself_is_kept_for_the_new_image(live, accounts):
    """strace holds the broker at the entry of its execve() while a second SIGHUP arrives.
    Before the new image has its handlers, SIGHUP's default action would kill it; the
    stop and reload signals are blocked across the exec, so the new image gets this one
    and re-executes once more."""
    mep = live()
    broker = mep.broker_pid()
    with procs.strace_holding(broker, "execve", "delay_enter=1500000:when=1"):
        os.kill(broker, signal.SIGHUP)
        # held: after its last words, stopped by the tracer (a signal's delivery stops it too,
        # so "t" alone could be the SIGHUP above)
        wait_for(lambda: "re-executing the broker" in mep.output() and procs.proc_state(broker) == "t", timeout=15,
                 what="the broker held at its execve()")
        os.kill(broker, signal.SIGHUP)  # arrives in the window between the two images
        wait_for(lambda: mep.output().count("broker re-executed in place") >= 2 or mep.proc.poll() is not None,
                 timeout=30, what="a second re-exec, for the SIGHUP that arrived during the first")
    assert mep.proc.poll() is None and mep.broker_pid() == broker, mep.output()[-3000:]
    mep.publish(mep.command("mept-alice@example.org"))
    wait_for(lambda: mep.reports_now(), what="a UEP started by the twice re-executed broker")
