"""The seed chapter, "Running the MEP" and "Hot Restarting", as an administrator follows it
(issue 16): the signals it names, sent to the pid the administrator sees.

    "To stop the MEP, type Ctrl+\\ (SIGQUIT) or Ctrl+C (SIGINT). Alternatively, the
     process also responds to SIGTERM."            -- Running the MEP
    "# kill -SIGHUP <the_mep_pid>"                  -- Hot Restarting

`mepctl start` becomes the root helper, which is also a systemd unit's MainPID; the
broker is its child. Both pids must answer. A clean stop: every UEP TERMed (not
KILLed) with its grace, its user told, the audit log's `End MEP session` sentinel,
exit code 0. The terminal cases run the MEP on a real pty as its controlling terminal
and type the keys, so that the kernel's line discipline sends the signal to the
foreground process group, as it does for an administrator.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess

import pytest

from tests.rigs import procs
from tests.rigs.accounts import PAM_DIR, pam_service
from tests.rigs.mep import Terminal
from tests.rigs.procs import wait_for

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("no_strays", "rabbitmq")]
HA = {"high_assurance": True, "subscription_id": "00000000-0000-0000-0000-000000000002"}
SLEEPY = {"PROBE_ACTION": json.dumps({"sleep": 600})}


def audit_path(rigdir):
    """A file the broker account can create (the audit log of a high-assurance MEP)."""
    folder = rigdir.path / f"audit-{os.urandom(3).hex()}"
    folder.mkdir()
    os.chown(folder, rigdir.accounts.broker.pw_uid, rigdir.accounts.broker.pw_gid)
    return folder / "audit.log"


def with_two_ueps(live, rigdir):
    audit = audit_path(rigdir)
    mep = live(config={**HA, "audit_log_path": str(audit)}, environment=SLEEPY)
    cmds = [mep.command(f"mept-{u}@example.org") for u in ("alice", "bob")]
    for cmd in cmds:
        mep.publish(cmd)
    pids = wait_for(lambda: len(r := mep.reports_now()) == 2 and list(r), what="two UEPs")
    return mep, cmds, pids, audit


def assert_clean_stop(mep, cmds, pids, audit, code):
    assert code == 0, mep.output()[-3000:]
    assert procs.wait_gone(pids, 5) == []
    log = mep.output()
    exits = [line for line in log.splitlines() if "user endpoint exited" in line]
    assert len(exits) == 2 and all("status=-15" in line for line in exits), exits  # TERM, not KILL
    for cmd in cmds:
        notice = mep.notice(cmd)
        assert notice and "shutting down" in notice["data"]["global_state"]["error"], notice
    assert "End MEP session -----" in audit.read_text().splitlines()[-1]
    assert "broker stopped" in log and "code=0" in log.split("broker stopped")[-1][:200]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGQUIT])
def test_a_stop_signal_to_the_root_pid_stops_the_mep_cleanly(live, rigdir, sig):
    mep, cmds, pids, audit = with_two_ueps(live, rigdir)
    assert "SigBlk:\t0000000000000000" in open(f"/proc/{mep.proc.pid}/status").read()
    os.kill(mep.proc.pid, sig)
    assert_clean_stop(mep, cmds, pids, audit, procs.reap(mep.proc, 30))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGQUIT])
def test_a_stop_signal_to_the_broker_pid_stops_the_mep_cleanly(live, rigdir, sig):
    mep, cmds, pids, audit = with_two_ueps(live, rigdir)
    os.kill(mep.broker_pid(), sig)
    assert_clean_stop(mep, cmds, pids, audit, procs.reap(mep.proc, 30))


@pytest.mark.parametrize("pid_of", ["root helper", "broker"])
def test_sighup_to_either_pid_hot_restarts_and_keeps_every_uep(live, rigdir, pid_of):
    mep, cmds, pids, audit = with_two_ueps(live, rigdir)
    broker = mep.broker_pid()
    os.kill(mep.proc.pid if pid_of == "root helper" else broker, signal.SIGHUP)
    wait_for(lambda: "broker re-executed in place" in mep.output(), what="the re-exec")
    assert mep.broker_pid() == broker and all(procs.alive(p) for p in pids) and mep.proc.poll() is None
    after = mep.command("mept-carol@example.org")  # and it serves on
    mep.publish(after)
    wait_for(lambda: len(mep.reports_now()) == 3, what="a start after the hot restart")


def test_a_second_stop_signal_to_the_root_pid_is_the_administrator_insisting(live, rigdir):
    """The broker is given its clean stop; a second TERM while it stops ends the helper,
    which stops every UEP itself (and reports why, exit code 2)."""
    mep, cmds, pids, audit = with_two_ueps(live, rigdir)
    os.kill(mep.broker_pid(), signal.SIGSTOP)  # a broker that does not get round to stopping
    try:
        os.kill(mep.proc.pid, signal.SIGTERM)
        wait_for(lambda: "SIGTERM received: SIGTERM to the broker" in mep.output(), what="the first TERM passed on")
        os.kill(mep.proc.pid, signal.SIGTERM)
        assert procs.reap(mep.proc, 30) == 2
    finally:
        procs.run("pkill", "-CONT", "-u", "mept-broker", check=False)
    assert procs.wait_gone(pids, 10) == []
    assert "SIGTERM received" in mep.output().split("to the broker")[-1]


@pytest.mark.parametrize("keys, name", [(b"\x03", "Ctrl+C"), (b"\x1c", "Ctrl+\\")])
def test_ctrl_c_and_ctrl_backslash_in_a_terminal_stop_the_mep_cleanly(live, rigdir, keys, name):
    audit = audit_path(rigdir)
    mep = live(config={**HA, "audit_log_path": str(audit)}, environment=SLEEPY)
    term = Terminal(mep)
    cmds = [mep.command(f"mept-{u}@example.org") for u in ("alice", "bob")]
    for cmd in cmds:
        mep.publish(cmd)
    pids = wait_for(lambda: len(r := mep.reports_now()) == 2 and list(r), what="two UEPs")
    sessions = [int(p) for p in procs.run("pgrep", "-P", str(mep.proc.pid), "-u", "root", check=False).stdout.split()]
    assert sessions and all(os.getpgid(p) != os.getpgid(mep.proc.pid) for p in sessions)  # not in the terminal's group
    term.type(keys)
    code = procs.reap(mep.proc, 30)
    log = term.read().decode("utf-8", "replace")
    assert code == 0, log[-3000:]
    assert procs.wait_gone(pids, 5) == []
    exits = [line for line in log.splitlines() if "user endpoint exited" in line]
    assert len(exits) == 2 and all("status=-15" in line for line in exits), (name, exits, log[-3000:])
    for cmd in cmds:
        assert "shutting down" in mep.notice(cmd)["data"]["global_state"]["error"]
    assert "End MEP session -----" in audit.read_text()
    os.close(term.master)


def test_start_log_to_console_and_debug_need_no_policy_edit(live, rigdir):
    """`mepctl start NAME --log-to-console --debug`: the root helper passes exactly these two
    flags on to the broker; the root-owned policy stays as it is."""
    mep = live()
    policy_text = mep.policy.read_text()
    os.kill(mep.broker_pid(), signal.SIGTERM)
    procs.reap(mep.proc, 30)
    mep.helper_log = open(mep.helper_log_path, "a")
    mep.proc = subprocess.Popen(mep.rigdir.helper_cmd(mep.policy, "--launch", "--broker-log-to-console", "--broker-debug"),
                                stdin=subprocess.DEVNULL, stdout=mep.helper_log, stderr=subprocess.STDOUT)
    wait_for(lambda: mep.output().count("consuming start commands") >= 2, what="the broker with the flags")
    started = [line for line in mep.output().splitlines() if "broker started" in line][-1]
    assert "console=True" in started and "debug=True" in started, started
    assert f"========== Endpoint Manager begins: {mep.endpoint_id}" in mep.output()
    assert f">>> Multi-User Endpoint ID: {mep.endpoint_id} <<<" in mep.output()
    assert mep.policy.read_text() == policy_text
    bad = subprocess.run(mep.rigdir.helper_cmd(mep.policy, "--launch", "--broker-flag", "--evil"), capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "unrecognized arguments" in bad.stderr  # no other flag gets through


# -- "Process Tree Invariant": the seed's own recipe finds the MEP and its user endpoints ---------

SEED_RECIPE = (r"""ps -eF --forest | perl -ne'if (/(\| +\| +)\\_ Globus Compute Endpoint \*/) { $pre = $1; """
               r"""$pre =~ s/\|/\\|/g; print; while (<>) { last if !/$pre/; print}}'""")


def test_the_seeds_ps_recipe_shows_the_mep_its_two_halves_and_every_uep(live, accounts):
    """The recipe matches a MEP two branches deep in the process forest (as in the seed's
    example, under a login session); the test starts the MEP at such a place: three
    levels of shells, each with a later sibling, then the root helper."""
    mep = live(environment={"PROBE_ACTION": json.dumps({"sleep": 600})})
    os.kill(mep.broker_pid(), signal.SIGTERM)
    procs.reap(mep.proc, 30)
    wrapper = subprocess.Popen(["bash", "-c", '( ( "$@"; : ) & sleep 600; ) & sleep 600 & wait', "forest",
                                *mep.rigdir.helper_cmd(mep.policy, "--launch")], stdout=mep.helper_log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: mep.output().count("consuming start commands") >= 2, what="the MEP in the forest")
        [helper] = map(int, wait_for(lambda: procs.run("pgrep", "-s", str(wrapper.pid), "-u", "root", "-f",
                                                     r"\[root helper\]", check=False).stdout.split(),
                                     what="the root helper with its title"))
        [broker] = [int(p) for p in procs.run("pgrep", "-P", str(helper), "-u", accounts.broker.pw_name,
                                            check=False).stdout.split()]
        for user in ("alice", "bob"):
            mep.publish(mep.command(f"mept-{user}@example.org"))
        ueps = wait_for(lambda: len(r := mep.reports_now()) == 2 and list(r), what="two UEPs")
        title = f"Globus Compute Endpoint *({mep.endpoint_id}, {mep.dir.name})"

        def shown():
            out = subprocess.run(["sh", "-c", SEED_RECIPE], capture_output=True, text=True).stdout
            return out if f"{title} [broker]" in out and all(f" {p} " in out for p in ueps) else None
        lines = wait_for(shown, what="the recipe's output").splitlines()
        assert lines[0].split()[:2] == ["root", str(helper)] and f"{title} [root helper]" in lines[0], lines
        assert any(line.split()[1] == str(broker) and f"{title} [broker]" in line for line in lines), lines
        for user in ("mept-alice", "mept-bob"):  # each UEP's root session process, told apart from the helper
            assert any(line.startswith("root ") and f"{title} [session of {user}]" in line for line in lines), lines
        for pid in ueps:  # the user endpoints, below the MEP in the recipe's output
            assert any(line.split()[1] == str(pid) for line in lines), (pid, lines)
        pstree = subprocess.run(["pstree", "-lsp", str(ueps[0])], capture_output=True, text=True).stdout
        assert f"({helper})" in pstree, pstree  # the UEP's ancestors include the MEP's root pid
    finally:
        os.killpg(wrapper.pid, signal.SIGTERM)
        procs.reap(wrapper, 30)
        procs.wait_gone(list(mep.reports_now()), 10)


# -- "Checking the Logs": the lines about processes starting and stopping, and PAM's ------------------

def test_the_logs_have_the_seeds_start_and_stop_lines(live, accounts):
    """"Creating new user endpoint (pid: P) [(USER, NAME) ARGV]" (the root helper's log: only its
    policy knows the argv), "Command process successfully forked for 'USER' (Globus effective
    identity: ID)." and "Command stopped normally (P) [(USER, NAME)]" (the broker's endpoint.log)."""
    mep = live(environment={"PROBE_ACTION": json.dumps({"exit": 0})})
    cmd = mep.command("mept-alice@example.org")
    mep.publish(cmd)
    name = cmd["kwargs"]["name"]
    pid = int(wait_for(lambda: list(mep.reports_now()), what="the UEP's report")[0])
    wait_for(lambda: "Command stopped normally" in mep.log_path.read_text(), what="the exit line")
    argv = " ".join(mep.reports_now()[pid][0]["argv"][1:])  # after the interpreter: the launcher and its arguments
    assert f"Creating new user endpoint (pid: {pid}) [(mept-alice, {name}) " in mep.output(), mep.output()[-3000:]
    assert argv.split()[-1] == name and argv.split()[-1] in mep.output()
    log = mep.log_path.read_text()
    assert (f"Command process successfully forked for 'mept-alice' (Globus effective identity: "
            f"{cmd['globus_effective_identity']}).") in log, log[-3000:]
    assert f"Command stopped normally ({pid}) [(mept-alice, {name})]" in log, log[-3000:]


def test_a_pam_refusal_is_logged_with_its_code_and_reaches_the_user(live, accounts, rigdir):
    """The seed's pam_shells example: a user whose shell is not in /etc/shells does not start,
    and the log has "(error code: 7 [PAM_AUTH_ERR]) Authentication failure"."""
    assert accounts.badshell.pw_shell not in pathlib.Path("/etc/shells").read_text().split()
    service = pam_service(f"shells-{os.urandom(3).hex()}", "account requisite pam_shells.so\n"
                                                              "session required pam_limits.so\n")
    try:
        mep = live(policy={"pam": {"enabled": True, "service": service}})
        cmd = mep.command("mept-badshell@example.org")
        mep.publish(cmd)
        notice = mep.notice(cmd)
        assert notice, mep.output()[-3000:]
        said = notice["data"]["global_state"]["error"]
        assert "(error code: 7 [PAM_AUTH_ERR]) Authentication failure" in said, said
        assert "(error code: 7 [PAM_AUTH_ERR]) Authentication failure" in mep.output()
        assert not mep.reports_now()  # no UEP ran
    finally:
        (PAM_DIR / service).unlink(missing_ok=True)
