"""Real accounts, groups and PAM services for the tests, and their removal.

Everything it creates is named with the `mept-` prefix and removed by `cleanup()`, which
conftest.py runs at the start (leftovers of a killed run) and at the end of the session;
`python -m tests.rigs.accounts cleanup` runs it by hand (bench/mutate.py does, per mutant).
"""

from __future__ import annotations

import os
import pwd
import shutil
import sys
from pathlib import Path

from tests.rigs.procs import run

PREFIX = "mept-"
PAM_DIR = Path("/etc/pam.d")


def add_user(name: str, *, system=False, uid=None, shell="/bin/bash", groups=(), non_unique=False) -> pwd.struct_passwd:
    cmd = ["useradd", "--shell", shell]
    cmd += ["--system", "--no-create-home"] if system else ["--create-home"]
    if uid is not None:
        cmd += ["--uid", str(uid)] + (["--non-unique"] if non_unique else [])
    if groups:
        cmd += ["--groups", ",".join(groups)]
    run(*cmd, name)
    return pwd.getpwnam(name)


def cleanup() -> None:
    """Remove every mept- user, group, PAM service and rig directory."""
    with open("/etc/passwd") as f:
        users = [line.split(":")[0] for line in f if line.startswith(PREFIX)]
    for user in users:
        run("pkill", "-KILL", "-u", user, check=False)
    for user in reversed(users):  # aliases (non-unique uids) were added last
        run("userdel", "--force", "--remove", user, check=False)
    with open("/etc/group") as f:
        groups = [line.split(":")[0] for line in f if line.startswith(PREFIX)]
    for group in groups:
        run("groupdel", group, check=False)
    for path in PAM_DIR.glob(PREFIX + "*"):
        path.unlink()
    for path in Path("/run").glob(PREFIX + "*"):
        shutil.rmtree(path, ignore_errors=True)


class Accounts:
    """The session's test accounts, by role."""

    def __init__(self):
        run("groupadd", PREFIX + "denygrp")
        run("groupadd", PREFIX + "science")
        self.broker = add_user(PREFIX + "broker", system=True, shell="/usr/sbin/nologin")
        self.alice = add_user(PREFIX + "alice")
        self.bob = add_user(PREFIX + "bob", groups=[PREFIX + "science"])
        self.carol = add_user(PREFIX + "carol")
        self.denied = add_user(PREFIX + "denied")
        self.ingroup = add_user(PREFIX + "ingroup", groups=[PREFIX + "denygrp"])
        self.system = add_user(PREFIX + "sys", system=True)  # uid below 1000
        self.badshell = add_user(PREFIX + "badshell", shell="/usr/sbin/nologin")
        # a second name for alice's uid: getpwuid(uid) gives "mept-alice", not this name
        self.alias = add_user(PREFIX + "alias", uid=self.alice.pw_uid, non_unique=True)
        self.nobody = pwd.getpwnam("nobody")


def pam_service(name: str, text: str) -> str:
    """Install /etc/pam.d/mept-NAME; returns the service name."""
    service = PREFIX + name
    path = PAM_DIR / service
    path.write_text(text)
    os.chmod(path, 0o644)
    return service


if __name__ == "__main__":  # `python -m tests.rigs.accounts cleanup`
    if sys.argv[1:] == ["cleanup"]:
        cleanup()
