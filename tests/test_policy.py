"""The policy file (SECURITY-REVIEW 9): the helper refuses to start on anything a
non-root user could have written, and on any key it does not know."""

import os
import shutil

import pytest

from tests.rigs import procs
from tests.rigs.helper import PYTHON

pytestmark = [pytest.mark.root]


def start(rigdir, policy):
    out = procs.run(*rigdir.helper_cmd(policy, "--fd", "0"), check=False)
    return out.returncode, out.stderr


@pytest.fixture
def scratch(rigdir):
    """A root-owned 0755 directory under the rig for files a test makes untrusted."""
    path = rigdir.path / f"scratch-{os.urandom(4).hex()}"
    path.mkdir(mode=0o755)
    yield path
    shutil.rmtree(path)


def test_a_good_policy_starts(rigdir, helpers):
    helper, client = helpers()
    req = client.req_id()
    from protocol.messages import Ping
    client.request(Ping(req))
    assert client.reply(req).type == "pong"
    client.sock.shutdown(2)  # the broker goes away cleanly: that is the helper's normal end, exit 0
    assert helper.wait() == 0
    assert "INFO ending: broker closed the connection" in helper.output()


@pytest.mark.parametrize("attack", ["owner", "group-writable", "world-writable", "dir-owner", "dir-writable"])
def test_untrusted_policy_file_stops_the_helper(rigdir, scratch, accounts, attack):
    policy = scratch / "policy.toml"
    shutil.copyfile(rigdir.policy(), policy)
    os.chmod(policy, 0o644)
    target = scratch if attack.startswith("dir") else policy
    if attack in ("owner", "dir-owner"):
        os.chown(target, accounts.alice.pw_uid, -1)
    elif attack == "group-writable":
        os.chmod(policy, 0o664)
    else:
        os.chmod(target, 0o757 if target.is_dir() else 0o646)
    code, err = start(rigdir, policy)
    assert code == 78
    assert "refusing to start: policy file" in err
    assert ("owned by uid" in err) if "owner" in attack else ("writable by group or others" in err)


@pytest.mark.parametrize("attack", ["exe-owner", "exe-writable", "exe-dir-writable", "relative", "symlink-to-user-file",
                                    "symlink-in-user-dir"])
def test_untrusted_uep_executable_stops_the_helper(rigdir, scratch, accounts, attack):
    exe = scratch / "uep"
    shutil.copyfile(rigdir.probe, exe)
    os.chmod(exe, 0o755)
    argv0 = str(exe)
    if attack == "exe-owner":
        os.chown(exe, accounts.alice.pw_uid, -1)
    elif attack == "exe-writable":
        os.chmod(exe, 0o775)
    elif attack == "exe-dir-writable":
        os.chmod(scratch, 0o1777)  # even sticky /tmp-style directories are refused
    elif attack == "relative":
        argv0 = "uep"
    elif attack == "symlink-in-user-dir":  # the target is fine, but alice could re-point the link
        link = os.path.join(accounts.alice.pw_dir, "uep-link")
        os.symlink(exe, link)
        os.lchown(link, accounts.alice.pw_uid, accounts.alice.pw_gid)
        argv0 = link
    else:
        home_file = os.path.join(accounts.alice.pw_dir, "evil")
        shutil.copyfile(rigdir.probe, home_file)
        os.chown(home_file, accounts.alice.pw_uid, accounts.alice.pw_gid)
        os.symlink(home_file, scratch / "link")
        argv0 = str(scratch / "link")
    code, err = start(rigdir, rigdir.policy(uep_argv=[argv0, "{name}"]))
    assert code == 78, err
    assert "uep_argv[0]" in err


@pytest.mark.parametrize("change,words", [
    ({"uep_argv": ["/usr/bin/true"]}, 'must contain the element "{name}" exactly once'),
    ({"uep_argv": ["/usr/bin/true", "{name}", "{name}"]}, 'exactly once'),
    ({"min_uid": 0}, "min_uid must be at least 1 (uid 0 is never spawned)"),
    ({"broker_user": "root"}, "broker_user must not be root"),
    ({"broker_user": "mept-nosuch"}, "does not exist"),
    ({"min_uidd": 1000}, "unknown key 'min_uidd'"),
    ({"min_uid": "1000"}, "min_uid must be a int"),
    ({"pam": {"enable": True}}, "unknown key 'enable'"),
    ({"uep_argv": None}, "required key 'uep_argv' is missing"),
    ({"max_frame": 2_000_000}, "max_frame must be in 1..1048576"),
])
def test_policy_mistakes_stop_the_helper(rigdir, change, words):
    code, err = start(rigdir, rigdir.policy(**change))
    assert code == 78
    assert words in err


def test_key_readable_by_others_stops_the_helper(rigdir, scratch):
    key = scratch / "key"
    key.write_bytes(os.urandom(32))
    os.chmod(key, 0o644)
    code, err = start(rigdir, rigdir.policy(key_file=str(key)))
    assert code == 78 and "readable by others" in err
    os.chmod(key, 0o600)
    key.write_bytes(os.urandom(31))
    code, err = start(rigdir, rigdir.policy(key_file=str(key)))
    assert code == 78 and "exactly 32 bytes" in err


def test_helper_refuses_code_others_can_write(rigdir, scratch):
    """The helper checks its own modules like the policy: root runs only root's code."""
    shutil.copytree(rigdir.lib / "privhelper", scratch / "privhelper")
    shutil.copytree(rigdir.lib / "protocol", scratch / "protocol")
    os.chmod(scratch / "protocol" / "framing.py", 0o666)
    from privhelper.__main__ import isolated_argv
    out = procs.run(*isolated_argv(PYTHON, str(scratch), ["--policy", str(rigdir.policy()), "--fd", "0"]), check=False)
    assert out.returncode == 78
    assert "helper code" in out.stderr and "framing.py is writable by group or others" in out.stderr


def test_helper_refuses_to_run_unprivileged(rigdir, accounts):
    out = procs.run("setpriv", f"--reuid={accounts.alice.pw_uid}", f"--regid={accounts.alice.pw_gid}", "--clear-groups",
                  *rigdir.helper_cmd(rigdir.policy(), "--fd", "0"), check=False)
    assert out.returncode == 77 and "must run as root" in out.stderr
