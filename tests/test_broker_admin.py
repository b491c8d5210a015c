"""The broker's lifecycle and administration, live: SIGHUP re-exec in place with UEPs
running, the admin socket and the mepctl commands on it, the foreground timer line on a
terminal only, AMQP reconnect, and the systemd unit of `mepctl enable-on-boot`.

Real parts throughout: RabbitMQ on 127.0.0.1, the root helper in --launch mode, the
broker as mept-broker, real accounts, the probe as the UEP program."""

import concurrent.futures
import json
import os
import signal
import socket
import stat
import subprocess
import time

import pytest
import yaml
from cryptography.fernet import Fernet

from tests.rigs import procs
from tests.rigs.procs import alive, wait_for

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("no_strays", "rabbitmq")]
WAIT_CRED = json.dumps({"cred_wait": 60, "sleep": 60})


def cmdline(pid: int) -> bytes:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read()


def sighup_and_wait(mep, pid: int, count: int) -> None:
    """SIGHUP the broker and wait for its `count`-th re-exec."""
    os.kill(pid, 1)
    wait_for(lambda: mep.output().count("broker re-executed in place") >= count or mep.proc.poll() is not None,
             what=f"re-exec number {count}")
    assert mep.proc.poll() is None, mep.output()


def test_sighup_reexecs_in_place_keeping_every_uep(live, accounts):
    mep = live(environment={"PROBE_ACTION": WAIT_CRED})
    alice, bob = mep.command("mept-alice@example.org"), mep.command("mept-bob@example.org")
    mep.publish(alice)
    mep.publish(bob)
    reports = wait_for(lambda: len(r := mep.reports_now()) == 2 and r, what="two UEPs")
    by_user = {r[0]["resuid"][0]: r[0] for r in reports.values()}
    alice_pid, bob_pid = by_user[accounts.alice.pw_uid]["pid"], by_user[accounts.bob.pw_uid]["pid"]
    broker = mep.broker_pid()
    before = cmdline(broker)
    config = json.loads((mep.dir / "config.yaml").read_text())
    mep.write("config.yaml", json.dumps({**config, "display_name": "renamed by the admin"}))

    sighup_and_wait(mep, broker, 1)
    assert mep.broker_pid() == broker and cmdline(broker) == before  # same process, same command line
    assert alive(alice_pid) and alive(bob_pid) and len(mep.reports_now()) == 2
    assert "user_endpoints=2" in mep.output().split("broker re-executed in place")[1].splitlines()[0]
    status = json.loads(mep.mepctl("status", "--json").stdout)
    assert status["display_name"] == "renamed by the admin" and status["pid"] == broker  # config reread
    assert status["user_endpoints"] == 2

    # the new image writes fresh credentials through the memfd it inherited: no new UEP
    again = mep.command("mept-alice@example.org", name=alice["kwargs"]["name"])
    again["kwargs"]["amqp_creds"]["token"] = "after-reexec"
    mep.publish(again)
    refreshed = wait_for(lambda: len(r := mep.report(alice_pid)) > 1 and r, what="the refresh")[1]
    enckey = json.loads(by_user[accounts.alice.pw_uid]["stdin"])["enckey"].encode()
    assert json.loads(Fernet(enckey).decrypt(refreshed["cred"].encode()))["amqp_creds"]["token"] == "after-reexec"
    assert len(mep.reports_now()) == 2

    # the helper session goes on (next sequence number): a new start spawns, a stop is seen
    mep.publish(mep.command("mept-carol@example.org"))
    wait_for(lambda: len(mep.reports_now()) == 3, what="carol's UEP after the re-exec")
    out = mep.mepctl("stop-uep", str(bob_pid))
    assert out.returncode == 0 and f"pid {bob_pid}" in out.stdout, out.stderr
    wait_for(lambda: "user endpoint exited" in mep.output() and not alive(bob_pid), what="bob's UEP to exit")
    assert f"pid={bob_pid}" in mep.output().split("user endpoint exited")[1].splitlines()[0]
    pids = list(mep.reports_now())
    assert mep.stop() == 0, mep.output()
    assert procs.wait_gone(pids) == []


def test_sighup_waits_for_a_helper_request_in_flight(live, accounts):
    """A re-exec waits (quiesce) for the reply to an admin's stop-uep that the helper is
    still serving, and the admin gets the answer from the image that asked."""
    mep = live()
    cmd = mep.command("mept-alice@example.org")
    mep.publish(cmd)
    alice_pid = mep.report()[0]["pid"]
    broker = mep.broker_pid()
    with procs.strace_holding(mep.proc.pid, "kill", "delay_exit=3000000"), \
            concurrent.futures.ThreadPoolExecutor(1) as pool:  # the helper spends 3 s in its killpg
        stopped = pool.submit(mep.mepctl, "stop-uep", cmd["kwargs"]["name"])
        wait_for(lambda: "op=stop-uep" in mep.output(), what="the stop-uep request")  # its signal request is out
        os.kill(broker, signal.SIGHUP)
        wait_for(lambda: "broker re-executed in place" in mep.output() or mep.proc.poll() is not None,
                 what="the re-exec")
        assert stopped.result(60).returncode == 0, stopped.result().stderr
    out = mep.output()
    assert out.index(f"signal TERM to UEP group {alice_pid}") < out.index("re-executing the broker"), out
    assert "reload postponed" not in out and mep.broker_pid() == broker
    wait_for(lambda: not alive(alice_pid), what="alice's UEP to stop")


def test_sighup_with_a_broken_config_keeps_the_running_broker(live, accounts):
    mep = live()
    broker = mep.broker_pid()
    good = (mep.dir / "config.yaml").read_text()
    mep.write("config.yaml", "multi_user: true\nidentity_mapping_config_path: [not, a, path]\n")
    os.kill(broker, 1)
    wait_for(lambda: "reload refused; the running configuration stays" in mep.output(), what="the refusal")
    assert "identity_mapping_config_path" in mep.output().split("reload refused")[1]
    out = mep.mepctl("reload")
    assert out.returncode == 1 and "reload refused" in out.stderr and "identity_mapping_config_path" in out.stderr
    assert "re-executing" not in mep.output() and mep.broker_pid() == broker
    mep.publish(mep.command("mept-alice@example.org"))  # still serving, with the old config
    assert mep.report()[0]["resuid"][0] == accounts.alice.pw_uid
    mep.write("config.yaml", good)
    out = mep.mepctl("reload")
    assert out.returncode == 0, out.stderr
    wait_for(lambda: "broker re-executed in place" in mep.output(), what="the re-exec after the fix")
    assert mep.broker_pid() == broker


def test_sighups_while_commands_stream_in_serve_each_command_once(live, accounts):
    mep = live(policy={"max_children_per_user": 8})
    broker = mep.broker_pid()
    commands = [mep.command(f"mept-{('alice', 'bob', 'carol')[i % 3]}@example.org") for i in range(24)]
    for i, cmd in enumerate(commands):
        mep.publish(cmd)
        if i % 6 == 5:
            sighup_and_wait(mep, broker, (i + 1) // 6)
    names = [c["kwargs"]["name"] for c in commands]
    reports = wait_for(lambda: len(r := mep.reports_now()) >= len(names) and r, timeout=60, what="24 UEPs")
    time.sleep(1)  # a duplicate spawn, if any, would show up now
    started = sorted(r[0]["argv"][-1] for r in mep.reports_now().values())
    assert started == sorted(names)  # every command served, none twice
    assert mep.broker_pid() == broker and len(reports) == 24
    assert mep.output().count("broker re-executed in place") == 4
    assert "user endpoint not started" not in mep.output() and "AMQP connection lost" not in mep.output()


def test_admin_socket_is_root_and_broker_only(live, accounts):
    mep = live()
    path = mep.dir / "run" / "admin.sock"
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode) and st.st_uid == accounts.broker.pw_uid and stat.S_IMODE(st.st_mode) == 0o600
    # another account cannot even connect (the directory and the socket are the broker's alone)
    probe = ("import socket,sys; s=socket.socket(socket.AF_UNIX)\n"
             "try: s.connect(sys.argv[1]); print('connected')\nexcept OSError as e: print(e.strerror)")
    out = procs.run("setpriv", f"--reuid={accounts.alice.pw_uid}", f"--regid={accounts.alice.pw_gid}", "--clear-groups",
                  "/usr/bin/python3", "-I", "-c", probe, str(path), check=False)
    assert out.stdout.strip() == "Permission denied", out.stderr
    # root is let in; SO_PEERCRED is what the broker checks
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(path))
        s.sendall(b'{"op": "no-such-op"}\n')
        reply = json.loads(s.makefile().readline())
    assert reply["ok"] is False and "unknown or malformed request" in reply["error"]


def test_mepctl_status_list_and_stop_uep(live, accounts):
    mep = live()
    cmds = [mep.command("mept-alice@example.org"), mep.command("mept-bob@example.org")]
    for cmd in cmds:
        mep.publish(cmd)
    wait_for(lambda: len(mep.reports_now()) == 2, what="two UEPs")
    status = mep.mepctl("status")
    assert status.returncode == 0, status.stderr
    assert f"endpoint id:      {mep.endpoint_id}" in status.stdout and "user endpoints:   2" in status.stdout
    assert f"as {accounts.broker.pw_name}" in status.stdout and "AMQP:             connected" in status.stdout
    listed = mep.mepctl("list")
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["USER", "UID", "PID", "UPTIME", "USER", "ENDPOINT", "ID"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == {"mept-alice", "mept-bob"}
    assert rows["mept-alice"][1] == str(accounts.alice.pw_uid) and rows["mept-alice"][4] == cmds[0]["kwargs"]["name"]
    alice_pid = int(rows["mept-alice"][2])
    assert mep.report(alice_pid)[0]["resuid"][0] == accounts.alice.pw_uid  # the pid listed is the UEP's
    stopped = mep.mepctl("stop-uep", cmds[0]["kwargs"]["name"])
    assert stopped.returncode == 0 and f"pid {alice_pid}" in stopped.stdout
    wait_for(lambda: not alive(alice_pid), what="alice's UEP to stop")
    wait_for(lambda: "mept-alice" not in mep.mepctl("list").stdout, what="the registry to drop it")
    missing = mep.mepctl("stop-uep", "no-such-uep")
    assert missing.returncode == 1 and "no running user endpoint 'no-such-uep'" in missing.stderr
    assert mep.mepctl("list", "--json").stdout.count('"user": "mept-bob"') == 1
    assert "user endpoint stopped by the administrator" in mep.output()


def test_mepctl_stop_stops_everything(live, accounts):
    mep = live()
    mep.publish(mep.command("mept-alice@example.org"))
    pid = mep.report()[0]["pid"]
    out = mep.mepctl("stop")
    assert out.returncode == 0, out.stderr
    procs.reap(mep.proc, 30)
    assert mep.proc.returncode == 0, mep.output()
    assert procs.wait_gone([pid]) == []
    gone = mep.mepctl("status")
    assert gone.returncode == 3 and "is not running" in gone.stderr and "(No such file or directory)" in gone.stderr
    assert f"mepctl start {mep.dir.name} --config-root {mep.rigdir.path}" in gone.stderr


def test_check_idmap_and_render_user_config_dry_runs(live, accounts, rigdir):
    mep = live()
    ident = mep.dir / "identity.json"
    ident.write_text(json.dumps(mep.command("mept-bob@example.org")["globus_identity_set"]))
    check = mep.mepctl("check-idmap", "--identity", str(ident))
    assert check.returncode == 0, check.stderr
    assert f"-> mept-bob (uid {accounts.bob.pw_uid})" in check.stdout and "mapper 1 (expression" in check.stdout
    rendered = mep.mepctl("render-user-config", "--identity", str(ident), "--options", '{"max_workers": 4}')
    assert rendered.returncode == 0, rendered.stderr
    assert "max_workers: 4" in rendered.stdout and "display_name: mept-bob" in rendered.stdout
    # the exact schema error, and what the user would be told
    bad = mep.mepctl("render-user-config", "--identity", str(ident), "--options", '{"max_workers": 99}')
    assert bad.returncode == 1 and "99 is greater than the maximum of 8" in bad.stderr
    assert "the user would be told: Unable to start user endpoint process for mept-bob" in bad.stderr
    # a value that tries to add YAML structure stays one quoted string
    attempt = "x\nengine: {type: GlobusComputeEngine}"
    sneaky = mep.mepctl("render-user-config", "--identity", str(ident), "--options", json.dumps({"worker_init": attempt}))
    assert sneaky.returncode == 0, sneaky.stderr
    config = yaml.safe_load(sneaky.stdout)
    assert config["worker_init"] == attempt and config["engine"]["type"] == "ThreadPoolEngine"
    # an identity no rule maps
    ident.write_text(json.dumps({"id": "0f3c8a7e-0000-0000-0000-000000000000", "username": "eve@elsewhere.org"}))
    unmapped = mep.mepctl("check-idmap", "--identity", str(ident))
    assert unmapped.returncode == 1 and "no rule of" in unmapped.stdout
    none = mep.mepctl("render-user-config", "--identity", str(ident))
    assert none.returncode == 1 and "Identity failed to map to a local user name." in none.stderr
    assert not mep.reports_now()  # dry runs never spawn


def test_timer_line_only_on_a_terminal(live):
    on_tty = live(tty=True)
    wait_for(lambda: on_tty.output().count("  ----> ") >= 2, what="the timer line on the terminal")
    assert f">>> Multi-User Endpoint ID: {on_tty.endpoint_id} <<<" in on_tty.output()
    assert b"user endpoints: 0\r" in on_tty.helper_log_path.read_bytes()  # rewritten in place
    in_file = live()
    time.sleep(2.5)
    assert "---->" not in in_file.output()
    # the test MEPs log to the console, where the seed's --log-to-console lines come first
    assert f"========== Endpoint Manager begins: {in_file.endpoint_id}\n" in in_file.output()


def test_amqp_connection_closed_by_the_server_is_re_established(live, accounts):
    mep = live()
    broker = mep.broker_pid()
    name = f"mep-broker {mep.dir.name} pid {broker}"
    listed = procs.run("rabbitmqctl", "-q", "list_connections", "pid", "client_properties").stdout
    conn = [line.split("\t")[0] for line in listed.splitlines() if name in line]
    assert len(conn) == 1, listed
    procs.run("rabbitmqctl", "-q", "close_connection", conn[0], "test: closed by the server")
    wait_for(lambda: "AMQP connection re-established" in mep.output(), timeout=30, what="the reconnect")
    assert "AMQP connection lost; reconnecting" in mep.output()
    mep.publish(mep.command("mept-alice@example.org"))
    assert mep.report(timeout=20)[0]["resuid"][0] == accounts.alice.pw_uid
    assert mep.broker_pid() == broker


def test_enable_on_boot_writes_a_unit_systemd_accepts(live, rigdir):
    mep = live()
    units = rigdir.path / f"units-{os.urandom(3).hex()}"
    units.mkdir()
    running = mep.mepctl("enable-on-boot", "--unit-dir", str(units))
    assert running.returncode == 1 and "is running; stop it first" in running.stderr
    mep.stop()
    out = mep.mepctl("enable-on-boot", "--unit-dir", str(units))
    assert out.returncode == 0, out.stderr
    unit = units / f"globus-compute-mep-{mep.dir.name}.service"
    assert f"systemctl enable globus-compute-mep-{mep.dir.name} --now" in out.stdout
    text = unit.read_text()
    assert f"-m broker.mepctl start {mep.dir.name} --config-root {rigdir.path}" in text
    assert "KillMode=mixed" in text and "ExecReload=" in text
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
    again = mep.mepctl("enable-on-boot", "--unit-dir", str(units))
    assert again.returncode == 1 and "already exists" in again.stderr
    off = mep.mepctl("disable-on-boot", "--unit-dir", str(units))
    assert f"rm {unit}" in off.stdout
