"""What the benchmarks run against, made and removed by them (as root): bench users
`mepb-NN`, a broker account, a PAM service `mepb-bench` (pam_unix account; runuser's
session stack: pam_keyinit, pam_limits, pam_unix), the static probe, helper policies and a key, under /run/mepb-*."""

from __future__ import annotations

import os
import pathlib
import pwd
import secrets
import shutil
import subprocess
import sysconfig
import tempfile

from privhelper.__main__ import isolated_argv

PREFIX = "mepb-"
PYTHON = "/usr/bin/python3"
PAM_SERVICE = PREFIX + "bench"
# runuser's session stack (Debian's /etc/pam.d/runuser), plus the account check that the
# helper makes and runuser, run by root, skips
PAM_STACK = ("account required pam_unix.so\n"
             "session optional pam_keyinit.so revoke\nsession required pam_limits.so\nsession required pam_unix.so\n")
HERE = pathlib.Path(__file__).resolve().parent


def helper_code_dir() -> str:
    """The installed helper (scripts/setup.sh), in the venv's root-owned site-packages: the
    helper refuses to run code from a directory others can write, as a checkout under /tmp."""
    purelib = pathlib.Path(sysconfig.get_paths()["purelib"])
    if not (purelib / "privhelper" / "__main__.py").exists():
        raise RuntimeError(f"no installed helper in {purelib}; run scripts/setup.sh first")
    return str(purelib)


def helper_argv(policy: pathlib.Path, *mode: str) -> list:
    return isolated_argv(PYTHON, helper_code_dir(), ["--policy", str(policy), *mode])


def run(*cmd) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def cleanup() -> None:
    with open("/etc/passwd") as f:
        users = [line.split(":")[0] for line in f if line.startswith(PREFIX)]
    for user in users:
        subprocess.run(["pkill", "-KILL", "-u", user], capture_output=True)
        subprocess.run(["userdel", "--force", "--remove", user], capture_output=True)
    pathlib.Path("/etc/pam.d", PAM_SERVICE).unlink(missing_ok=True)
    for path in pathlib.Path("/run").glob(PREFIX + "*"):
        shutil.rmtree(path, ignore_errors=True)


class Fixture:
    def __init__(self, users: int = 50):
        self.n_users = users

    def __enter__(self) -> "Fixture":
        cleanup()
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix=PREFIX, dir="/run"))
        os.chmod(self.dir, 0o755)
        run("useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PREFIX + "broker")
        self.broker = pwd.getpwnam(PREFIX + "broker")
        self.accounts = []
        for i in range(self.n_users):
            run("useradd", "--no-create-home", "--shell", "/bin/bash", f"{PREFIX}{i:02d}")
            self.accounts.append(pwd.getpwnam(f"{PREFIX}{i:02d}"))
        pathlib.Path("/etc/pam.d", PAM_SERVICE).write_text(PAM_STACK)
        self.pam_service = PAM_SERVICE
        self.probe = str(self.dir / "probe")
        run("gcc", "-O2", "-static", "-o", self.probe, str(HERE / "probe.c"))
        os.chmod(self.probe, 0o755)
        self.key = secrets.token_bytes(32)
        key_file = self.dir / "key"
        key_file.write_bytes(self.key)
        os.chown(key_file, 0, self.broker.pw_gid)
        os.chmod(key_file, 0o640)
        base = (f'broker_user = "{self.broker.pw_name}"\nkey_file = "{key_file}"\nuep_argv = ["{self.probe}", "{{name}}"]\n'
                f"max_children = 1024\nmax_children_per_user = 64\nstop_grace_seconds = 1\n")
        self.policy_nopam = self._policy("nopam", base)
        self.policy_pam = self._policy("pam", base + f'\n[pam]\nenabled = true\nservice = "{PAM_SERVICE}"\n')
        return self

    def _policy(self, name: str, text: str) -> pathlib.Path:
        path = self.dir / f"policy-{name}.toml"
        path.write_text(text)
        os.chmod(path, 0o644)
        return path

    def __exit__(self, *exc) -> None:
        cleanup()
