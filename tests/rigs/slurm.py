"""The scheduler's layer of the test rig: a real single-node Slurm cluster for the batch
tests, from Debian's packages.

munged (as the munge user), slurmctld and slurmd run in the foreground as this process's
children, each known by its pid, with every file (config, munge key and socket, state,
spool, logs, the job completion log) in one temporary directory: nothing under /etc or
/run is touched, and stop() ends exactly the processes start() made. The Slurm client
tools find the cluster through SLURM_CONF (`env`), which the MEP passes to every UEP via
user_environment.yaml as an administrator would. Slurm's ports (6817/6818) are fixed
machine-wide, so there is one cluster per machine: start() refuses when they are taken.

No systemd, no cgroups, no accounting database: proctrack/linuxproc, task/none, a
filetxt job completion log. Without accounting (slurmdbd and a database) Slurm cannot
know accounts: any `--account` is taken as given (and AllowAccounts= would leave every
job pending), so only a wrong partition is refused at submission here.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from tests.rigs.procs import port_free, wait_for

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo")
PORTS = (6817, 6818)
PARTITION = "debug"

SLURM_CONF = """\
ClusterName=mept
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc={dir}/jobcomp.log
SchedulerType=sched/backfill
KillWait=5
MinJobAge=30
{node} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName={partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def why_not_available() -> str | None:
    """None when this machine can run the cluster; otherwise why not."""
    if os.geteuid() != 0:
        return "the Slurm cluster needs root"
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        return f"Slurm is not installed (missing {', '.join(missing)}); run scripts/setup.sh"
    return None


def node_line() -> str:
    """This machine's node line as slurmd itself measures it (`slurmd -C`), without UpTime."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    return next(line for line in out.splitlines() if line.startswith("NodeName="))


class Cluster:
    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="mept-slurm-"))
        os.chmod(self.dir, 0o755)  # users' sbatch/squeue read slurm.conf and reach the munge socket here
        self.conf = self.dir / "slurm.conf"
        self.munge_dir = self.dir / "munge"
        self.munge_socket = self.munge_dir / "munge.socket"
        self.jobcomp = self.dir / "jobcomp.log"
        self.env = {"SLURM_CONF": str(self.conf)}
        self.procs: dict[str, subprocess.Popen] = {}
        self.node = node_line()
        self.host = self.node.split()[0].split("=", 1)[1]

    # -- bring up, take down -------------------------------------------------------------

    def start(self) -> "Cluster":
        taken = [p for p in PORTS if not port_free(p)]
        if taken:
            raise RuntimeError(f"Slurm's ports {taken} are taken: another Slurm cluster runs on this machine; "
                               "one cluster per machine")
        munge = pwd.getpwnam("munge")
        self.munge_dir.mkdir(mode=0o755)
        for sub in ("state", "spool"):
            (self.dir / sub).mkdir(mode=0o755)
        key = self.munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        for path in (self.munge_dir, key):
            os.chown(path, munge.pw_uid, munge.pw_gid)
        self.conf.write_text(SLURM_CONF.format(
            host=self.host, ctld_port=PORTS[0], d_port=PORTS[1], munge_socket=self.munge_socket, dir=self.dir,
            node=self.node, partition=PARTITION))
        os.chmod(self.conf, 0o644)
        try:
            self._spawn("munged", ["setpriv", f"--reuid={munge.pw_uid}", f"--regid={munge.pw_gid}", "--clear-groups",
                                   "munged", "--foreground", f"--socket={self.munge_socket}",
                                   f"--key-file={key}", f"--pid-file={self.munge_dir}/munged.pid",
                                   f"--log-file={self.munge_dir}/munged.log",
                                   f"--seed-file={self.munge_dir}/munged.seed"])
            self._wait(lambda: self.munge_socket.exists(), "munged's socket")
            self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
            self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf)])
            self._wait(lambda: self.node_state() == "idle", "the node to be idle")
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, name: str, argv: list) -> None:
        log = open(self.dir / f"{name}.out", "w")
        self.procs[name] = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **self.env})
        log.close()

    def _wait(self, predicate, what: str, timeout: float = 30.0) -> None:
        def dead():
            return [n for n, p in self.procs.items() if p.poll() is not None]
        try:
            wait_for(lambda: dead() or predicate(), timeout, 0.1, what)
        except AssertionError:
            raise RuntimeError(f"timed out waiting for {what}:\n{self.logs()}") from None
        if dead():
            raise RuntimeError(f"{dead()} ended while waiting for {what}:\n{self.logs()}")

    def stop(self) -> None:
        """Cancel every job left, then end the daemons (by pid) and remove the directory."""
        try:
            if all(p.poll() is None for p in self.procs.values()) and len(self.procs) == 3:
                self.cancel_all()
        finally:
            for name in ("slurmd", "slurmctld", "munged"):
                proc = self.procs.pop(name, None)
                if proc is None:
                    continue
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
            shutil.rmtree(self.dir, ignore_errors=True)

    def cancel_all(self, timeout: float = 30.0) -> None:
        ids = [j["id"] for j in self.jobs()]
        if ids:
            self.run("scancel", *ids, check=False)
        try:
            wait_for(lambda: not self.jobs(), timeout, 0.2, what="the cancelled jobs to leave the queue")
        except AssertionError:
            pass  # not a failure here: a test that cares looks at the queue itself

    # -- looking at it -------------------------------------------------------------------

    def run(self, *cmd, check=True, user: str | None = None) -> subprocess.CompletedProcess:
        """A Slurm client command against this cluster (as root, or as `user` via setpriv)."""
        argv = list(cmd)
        if user is not None:
            pw = pwd.getpwnam(user)
            argv = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups", "--no-new-privs",
                    "--"] + argv
        return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=60,
                              env={"PATH": "/usr/bin:/bin", "HOME": "/", **self.env})

    def node_state(self) -> str:
        out = self.run("sinfo", "-h", "-N", "-o", "%T", check=False)
        return out.stdout.strip().rstrip("*") if out.returncode == 0 else ""

    def jobs(self, user: str | None = None) -> list:
        """The jobs in the queue (any state squeue lists), as dicts: id, user, state, name, account."""
        out = self.run("squeue", "-h", "-o", "%i|%u|%T|%j|%a", *(["-u", user] if user else []))
        rows = [line.split("|") for line in out.stdout.splitlines() if line.strip()]
        return [dict(zip(("id", "user", "state", "name", "account"), row)) for row in rows]

    def completed(self) -> list:
        """The job completion log (jobcomp/filetxt), one dict of its key=value fields per job."""
        if not self.jobcomp.exists():
            return []
        records = []
        for line in self.jobcomp.read_text().splitlines():
            fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
            records.append(fields)
        return records

    def logs(self) -> str:
        parts = []
        for path in sorted(self.dir.glob("*.out")) + sorted(self.dir.glob("*.log")) + \
                sorted(self.munge_dir.glob("*.log")):
            try:
                parts.append(f"--- {path.name}\n{path.read_text()[-3000:]}")
            except OSError:
                pass
        return "\n".join(parts)
