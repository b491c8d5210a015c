"""The systemd units (systemd/*.in, rendered by `mepctl enable-on-boot`): systemd's own
checker accepts every one without a warning, each stays under the exposure threshold that
SECURITY.md justifies, and the socket-activated pair runs a real MEP.

No systemd runs here, so the end-to-end test does what the units tell systemd to do:
systemd-socket-activate --accept stands in for the .socket (then the socket gets the
unit's group and mode), the helper runs the helper unit's ExecStart under exactly its
CapabilityBoundingSet, and the broker runs the broker unit's ExecStart as its User= with
NO_NEW_PRIVS, an empty bounding set and the kernel's memory-deny-write-execute (what
MemoryDenyWriteExecute=yes asks for)."""

from __future__ import annotations

import ctypes
import os
import pathlib
import re
import shlex
import signal
import subprocess

import pytest

from broker import boot
from tests.rigs import procs
from tests.rigs.accounts import pam_service
from tests.rigs.helper import ROOT
from tests.rigs.mep import VENV_PYTHON, LiveMEP
from tests.rigs.procs import wait_for

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("no_strays", "rabbitmq")]
MEPCTL = ["/opt/mep/venv/bin/python3", "-c", "import sys; sys.path.insert(0, sys.argv.pop(1)); "
          "from broker.mepctl import main; sys.exit(main())"]
# SECURITY.md, "The systemd units": why each number
THRESHOLDS = {"broker.service.in": 2.0, "helper@.service.in": 5.0, "launch.service.in": 5.0}
CAP_NUMBERS = {"CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_DAC_READ_SEARCH": 2, "CAP_FOWNER": 3, "CAP_KILL": 5,
               "CAP_SETGID": 6, "CAP_SETUID": 7, "CAP_SETPCAP": 8, "CAP_SYS_RESOURCE": 24, "CAP_AUDIT_WRITE": 29,
               "CAP_AUDIT_CONTROL": 30}
PR_SET_MDWE, PR_GET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 66, 1
# sets memory-deny-write-execute, then execs argv; the kernel keeps it across fork and exec
MDWE_EXEC = ("import ctypes, os, sys; libc = ctypes.CDLL(None, use_errno=True); "
             f"sys.exit('PR_SET_MDWE failed') if libc.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) "
             "else os.execvp(sys.argv[1], sys.argv[1:])")


def parse_unit(text: str) -> dict:
    """{(section, key): [values]} of a unit file (no line continuations in ours)."""
    out, section = {}, None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault((section, key), []).append(value)
    return out


def enable_on_boot(rigdir, name, croot, unit_dir, *extra):
    unit_dir.mkdir(exist_ok=True)
    return subprocess.run([*MEPCTL, str(rigdir.lib), "enable-on-boot", name, "--config-root", str(croot),
                           "--unit-dir", str(unit_dir), *extra], capture_output=True, text=True)


@pytest.fixture
def configured(rigdir, accounts):
    """A MEP directory written by `mepctl configure`, as an administrator would have it."""
    croot = rigdir.path / f"conf-{os.urandom(3).hex()}"
    out = subprocess.run([*MEPCTL, str(rigdir.lib), "configure", "--multi-user", "units", "--config-root", str(croot),
                          "--broker-user", accounts.broker.pw_name, "--uep-executable", str(rigdir.probe)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    yield croot
    procs.run("rm", "-rf", str(croot))


def test_every_unit_template_is_rendered_by_enable_on_boot(rigdir, configured):
    shipped = {p.name for p in (ROOT / "systemd").glob("*.in")}
    used = {t for mode in (False, True) for t in boot.unit_files("x", mode).values()}
    assert shipped == used == set(THRESHOLDS) | {"helper.socket.in"}
    units = rigdir.path / f"units-{os.urandom(3).hex()}"
    out = enable_on_boot(rigdir, "units", configured, units, "--socket-activated")
    assert out.returncode == 0, out.stderr
    assert "systemctl enable globus-compute-mep-units-helper.socket globus-compute-mep-units --now" in out.stdout
    assert sorted(p.name for p in units.iterdir()) == ["globus-compute-mep-units-helper.socket",
                                                       "globus-compute-mep-units-helper@.service",
                                                       "globus-compute-mep-units.service"]
    again = enable_on_boot(rigdir, "units", configured, units)  # the launch unit has the broker unit's name
    assert again.returncode == 1 and "already exist" in again.stderr
    off = subprocess.run([*MEPCTL, str(rigdir.lib), "disable-on-boot", "units", "--unit-dir", str(units)],
                         capture_output=True, text=True)
    assert "systemctl stop globus-compute-mep-units.service globus-compute-mep-units-helper.socket" in off.stdout
    assert all(str(p) in off.stdout for p in units.iterdir())
    procs.run("rm", "-rf", str(units))


@pytest.mark.parametrize("socket_activated", [False, True], ids=["launch", "socket-activated"])
def test_systemd_verifies_each_unit_and_its_exposure_is_under_the_threshold(rigdir, configured, socket_activated):
    units = rigdir.path / f"units-{os.urandom(3).hex()}"
    out = enable_on_boot(rigdir, "units", configured, units, *(["--socket-activated"] if socket_activated else []))
    assert out.returncode == 0, out.stderr
    for unit, template in boot.unit_files("units", socket_activated).items():
        verify = subprocess.run(["systemd-analyze", "verify", "--man=no", str(units / unit)],
                                capture_output=True, text=True)
        assert verify.returncode == 0 and not verify.stderr.strip(), f"{unit}: {verify.stderr}"  # warnings fail too
        if not unit.endswith(".service"):
            continue
        security = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager",
                                   f"--threshold={round(THRESHOLDS[template] * 10)}", str(units / unit)],
                                  capture_output=True, text=True)
        exposure = re.search(r"Overall exposure level for \S+: ([0-9.]+)", security.stdout)
        assert exposure, security.stdout + security.stderr
        assert security.returncode == 0 and float(exposure[1]) <= THRESHOLDS[template], \
            f"{unit}: exposure {exposure[1]} over {THRESHOLDS[template]}\n{security.stdout}"
    procs.run("rm", "-rf", str(units))


def test_a_config_under_a_home_directory_stays_visible_to_the_broker(accounts, tmp_path):
    home = pathlib.Path(accounts.alice.pw_dir) / f"mepconf-{os.urandom(3).hex()}"
    (home / "h").mkdir(parents=True)
    try:
        (home / "h" / "helper-policy.toml").write_text(f'broker_user = "{accounts.broker.pw_name}"\n')
        (home / "h" / "config.yaml").write_text("audit_log_path: /var/log/mep-audit.log\n")
        broker = parse_unit(boot.render("h", home, socket_activated=True)["globus-compute-mep-h.service"])
        assert broker["Service", "ProtectHome"] == ["read-only"]
        assert broker["Service", "ReadWritePaths"] == [f"{home}/h/endpoint.log {home}/h/run -/var/log/mep-audit.log"]
        assert broker["Service", "User"] == [accounts.broker.pw_name]
    finally:
        procs.run("rm", "-rf", str(home))


class SocketActivatedMEP(LiveMEP):
    """A LiveMEP started the way the rendered socket-activated units start it."""

    def launch(self, out) -> subprocess.Popen:
        self.out = out
        name, croot = self.dir.name, self.dir.parent
        (self.dir / "helper-policy.toml").write_bytes(self.policy.read_bytes())
        os.chmod(self.dir / "helper-policy.toml", 0o644)
        (self.dir / "helper.key").write_bytes(self.rigdir.key)
        os.chown(self.dir / "helper.key", 0, self.accounts.broker.pw_gid)
        os.chmod(self.dir / "helper.key", 0o640)
        self.units = {u: parse_unit(t) for u, t in boot.render(name, croot, socket_activated=True,
                                                                python=VENV_PYTHON).items()}
        base = boot.service_name(name)
        sock, helper = self.units[f"{base}-helper.socket"], self.units[f"{base}-helper@.service"]
        self.broker_unit = self.units[f"{base}.service"]
        assert sock["Socket", "Accept"] == ["yes"] and sock["Socket", "SocketUser"] == ["root"]
        self.sock_path = pathlib.Path(sock["Socket", "ListenStream"][0])
        self.caps = helper["Service", "CapabilityBoundingSet"][0].split()
        bounding = "-all," + ",".join("+" + c.removeprefix("CAP_").lower() for c in self.caps)
        self.activator = subprocess.Popen(
            ["setpriv", f"--bounding-set={bounding}", "--", "systemd-socket-activate", "--accept", "-l",
             str(self.sock_path), *shlex.split(helper["Service", "ExecStart"][0])],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env={"PATH": "/usr/bin:/bin"})
        wait_for(self.sock_path.exists, what="the helper socket")
        procs.run("chgrp", sock["Socket", "SocketGroup"][0], str(self.sock_path))
        os.chmod(self.sock_path, int(sock["Socket", "SocketMode"][0], 8))
        return self.start_broker()

    def start_broker(self) -> subprocess.Popen:
        unit = self.broker_unit
        assert unit["Service", "NoNewPrivileges"] == ["yes"] and unit["Service", "CapabilityBoundingSet"] == [""]
        assert unit["Service", "MemoryDenyWriteExecute"] == ["yes"]
        user = unit["Service", "User"][0]
        argv = ["/usr/bin/python3", "-c", MDWE_EXEC, "setpriv", f"--reuid={user}", f"--regid={unit['Service', 'Group'][0]}",
                "--init-groups", "--no-new-privs", "--bounding-set=-all", "--inh-caps=-all", "--",
                *shlex.split(unit["Service", "ExecStart"][0]), "--log-to-console"]
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.out, stderr=subprocess.STDOUT,
                                env={"PATH": "/usr/bin:/bin"}, cwd="/")

    def broker_pid(self) -> int:
        return self.proc.pid  # setpriv and the MDWE wrapper exec: the Popen's pid is the broker's

    def helper_instances(self) -> list:
        return [int(p) for p in procs.run("pgrep", "-P", str(self.activator.pid), check=False).stdout.split()]

    def stop(self, sig=15) -> int:
        code = super().stop(sig)
        self.activator.terminate()
        procs.reap(self.activator, 15)
        procs.run("rm", "-rf", str(self.sock_path.parent))
        return code


def proc_status(pid: int) -> dict:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def test_memory_deny_write_execute_survives_exec():
    """The stand-in for MemoryDenyWriteExecute=yes is real: a program exec'd under it reports it set."""
    probe = "import ctypes; print(ctypes.CDLL(None).prctl(%d, 0, 0, 0, 0))" % PR_GET_MDWE
    out = subprocess.run(["/usr/bin/python3", "-c", MDWE_EXEC, "/usr/bin/python3", "-c", probe],
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == str(PR_MDWE_REFUSE_EXEC_GAIN), out
    assert ctypes.CDLL(None).prctl(PR_GET_MDWE, 0, 0, 0, 0) == 0  # and this process is not under it


def test_socket_activated_units_run_a_mep_end_to_end(rigdir, accounts):
    pam = pam_service("units", "auth required pam_permit.so\naccount required pam_unix.so\n"
                          "session required pam_limits.so\n")
    mep = SocketActivatedMEP(rigdir, policy={"pam": {"enabled": True, "service": pam}})
    try:
        alice, bob = mep.command("mept-alice@example.org"), mep.command("mept-bob@example.org")
        mep.publish(alice)
        mep.publish(bob)
        wait_for(lambda: len(mep.reports_now()) == 2, what="two UEPs")
        uids = sorted(r[0]["resuid"][0] for r in mep.reports_now().values())
        assert uids == sorted([accounts.alice.pw_uid, accounts.bob.pw_uid])
        [helper] = mep.helper_instances()  # one helper per connection (Accept=yes)
        helper_status = proc_status(helper)
        assert helper_status["Uid"].split()[0] == "0"
        unit_caps = sum(1 << CAP_NUMBERS[c] for c in mep.caps)  # what this machine's root has of them:
        assert int(helper_status["CapBnd"], 16) == unit_caps & int(proc_status(os.getpid())["CapBnd"], 16)
        broker_status = proc_status(mep.broker_pid())
        assert broker_status["Uid"].split() == [str(accounts.broker.pw_uid)] * 4
        assert int(broker_status["CapBnd"], 16) == 0 and broker_status["NoNewPrivs"] == "1"
        listed = mep.mepctl("list")  # the admin socket works in this sandbox too
        assert listed.returncode == 0 and "mept-alice" in listed.stdout and "mept-bob" in listed.stdout, listed

        # a broker that dies takes its helper and UEPs with it; the next one gets a fresh helper
        pids = list(mep.reports_now())
        os.kill(mep.broker_pid(), signal.SIGKILL)
        procs.reap(mep.proc, 10)
        assert procs.wait_gone(pids + [helper], 10) == []
        mep.proc = mep.start_broker()
        wait_for(lambda: mep.output().count("consuming start commands") == 2, what="the second broker")
        mep.publish(mep.command("mept-alice@example.org"))
        wait_for(lambda: len(mep.reports_now()) == 3, what="a UEP from the second broker")
        assert len(mep.helper_instances()) == 1 and mep.helper_instances() != [helper]
        mep.stop()
        assert "Traceback" not in mep.output()
    finally:
        mep.stop()
        mep.remove()
