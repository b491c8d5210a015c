"""load_policy() and read_key() in-process: every key's type and bound at its edge, and the
trusted-path rule on each file the policy names. Root-owned files in a scratch directory
under /run; no users are created (broker_user is Debian's `daemon`). The same refusals as
the helper prints them at start: tests/test_policy.py."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from privhelper.policy import DEFAULT_ENV_DENY, Pam, PolicyError, check_trusted_path, load_policy, read_key
from tests.rigs.helper import toml

pytestmark = [pytest.mark.root]


@pytest.fixture
def d():
    path = Path(tempfile.mkdtemp(prefix="mep-policy-", dir="/run"))
    os.chmod(path, 0o755)
    (path / "uep").write_text("#!/bin/sh\n")
    os.chmod(path / "uep", 0o755)
    (path / "key").write_bytes(bytes(range(32)))
    os.chmod(path / "key", 0o640)
    yield path
    shutil.rmtree(path)


def write(d: Path, name="policy.toml", mode=0o644, **table) -> str:
    base = {"broker_user": "daemon", "key_file": str(d / "key"), "uep_argv": [str(d / "uep"), "{name}"]}
    base.update(table)
    path = d / name
    path.write_text(toml({k: v for k, v in base.items() if v is not None}))
    os.chmod(path, mode)
    return str(path)


def refused(path, words):
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert words in str(info.value), str(info.value)
    return str(info.value)


def test_a_minimal_policy_and_its_defaults(d):
    path = write(d)
    p = load_policy(path)
    assert (p.path, p.broker_user, p.broker_uid, p.key_file) == (path, "daemon", 1, str(d / "key"))
    assert p.uep_argv == (str(d / "uep"), "{name}") and p.broker_argv == ()
    assert (p.min_uid, p.max_uid, p.max_children, p.max_children_per_user) == (1000, 2**31 - 1, 256, 4)
    assert (p.stop_grace_seconds, p.io_timeout_seconds, p.max_frame) == (3, 10, 2**20)
    assert (p.path_env, p.lang, p.env_deny) == ("/usr/local/bin:/usr/bin:/bin", "C.UTF-8", DEFAULT_ENV_DENY)
    assert p.pam == Pam(False, "globus-compute-endpoint", False) and p.pam.keep_bounding_set is True
    assert p.env_allow == frozenset()
    assert p.deny_users == p.deny_groups == p.allow_users == p.allow_groups == frozenset()
    assert read_key(p) == bytes(range(32))


def test_every_key_is_kept(d):
    p = load_policy(write(d, broker_argv=[str(d / "uep"), "-m", "x"], min_uid=1, max_uid=5, deny_users=["a", "b"],
                          deny_groups=["g"], allow_users=["u"], allow_groups=["h"], max_children=7, max_children_per_user=1,
                          env_deny=["SITE_*"], path="/p", lang="L", stop_grace_seconds=1, io_timeout_seconds=1, max_frame=1,
                          pam={"enabled": True, "service": "svc", "no_new_privs": True}))
    assert p.broker_argv == (str(d / "uep"), "-m", "x")
    assert (p.min_uid, p.max_uid, p.max_children, p.max_children_per_user) == (1, 5, 7, 1)
    assert (p.stop_grace_seconds, p.io_timeout_seconds, p.max_frame, p.path_env, p.lang) == (1, 1, 1, "/p", "L")
    assert (p.deny_users, p.deny_groups, p.allow_users, p.allow_groups) == ({"a", "b"}, {"g"}, {"u"}, {"h"})
    assert p.env_deny == DEFAULT_ENV_DENY + ("SITE_*",)
    assert p.pam == Pam(True, "svc", True)
    p = load_policy(write(d, env_allow=["LD_LIBRARY_PATH", "PYTHONPATH"], pam={"enabled": True, "keep_bounding_set": False}))
    assert p.env_allow == {"LD_LIBRARY_PATH", "PYTHONPATH"} and not p.env_denied("LD_LIBRARY_PATH") and p.env_denied("LD_PRELOAD")
    assert p.pam == Pam(True, "globus-compute-endpoint", False, False) and p.pam.keep_bounding_set is False


@pytest.mark.parametrize("name", ["HOME", "USER", "LOGNAME", "SHELL"])
def test_env_allow_may_not_name_what_the_passwd_entry_sets(d, name):
    refused(write(d, env_allow=["LD_LIBRARY_PATH", name]), f"env_allow may not name {name}: the helper sets it from the passwd entry")
    assert load_policy(write(d, env_allow=[name + "X", "X" + name])).env_allow == {name + "X", "X" + name}


@pytest.mark.parametrize("key", ["max_children", "max_children_per_user", "io_timeout_seconds", "stop_grace_seconds"])
def test_counts_and_timeouts_must_be_at_least_one(d, key):
    assert getattr(load_policy(write(d, **{key: 1})), key) == 1
    refused(write(d, **{key: 0}), f"{key} must be at least 1")
    refused(write(d, **{key: -1}), f"{key} must be at least 1")


def test_min_uid_and_max_frame_edges(d):
    assert load_policy(write(d, min_uid=1)).min_uid == 1
    refused(write(d, min_uid=0), "min_uid must be at least 1 (uid 0 is never spawned)")
    for frame in (1, 2**20):
        assert load_policy(write(d, max_frame=frame)).max_frame == frame
    for frame in (0, 2**20 + 1):
        refused(write(d, max_frame=frame), "max_frame must be in 1..1048576")


@pytest.mark.parametrize("table,words", [
    ({"broker_user": None}, "required key 'broker_user' is missing"),
    ({"key_file": None}, "required key 'key_file' is missing"),
    ({"uep_argv": None}, "required key 'uep_argv' is missing"),
    ({"nope": 1}, "unknown key 'nope'"),
    ({"min_uid": True}, "min_uid must be a int, not bool"),
    ({"max_frame": "1"}, "max_frame must be a int, not str"),
    ({"lang": 1}, "lang must be a str, not int"),
    ({"path": ["/bin"]}, "path must be a str, not list"),
    ({"deny_users": "root"}, "deny_users must be a list, not str"),
    ({"pam": True}, "pam must be a dict, not bool"),
    ({"pam": {"enabled": 1}}, "[pam]: enabled must be a bool, not int"),
    ({"pam": {"service": False}}, "[pam]: service must be a str, not bool"),
    ({"pam": {"nnp": True}}, "[pam]: unknown key 'nnp'"),
    ({"deny_users": ["a", ""]}, "deny_users must be a list of non-empty strings"),
    ({"allow_groups": [1]}, "allow_groups must be a list of non-empty strings"),
    ({"env_deny": [""]}, "env_deny must be a list of non-empty strings"),
    ({"uep_argv": []}, "uep_argv must not be empty"),
    ({"uep_argv": ["{name}"]}, "uep_argv[0] '{name}' is not an absolute path"),
    ({"broker_user": "mept-no-such-broker"}, "broker_user 'mept-no-such-broker' does not exist"),
    ({"broker_user": "root"}, "broker_user must not be root"),
])
def test_policy_mistakes(d, table, words):
    refused(write(d, **table), words)


def test_uep_argv_rules(d):
    exe = str(d / "uep")
    refused(write(d, uep_argv=[exe]), 'uep_argv must contain the element "{name}" exactly once')
    refused(write(d, uep_argv=[exe, "{name}", "x", "{name}"]), "exactly once")
    assert load_policy(write(d, uep_argv=[exe, "a", "{name}", "b"])).uep_argv == (exe, "a", "{name}", "b")
    assert load_policy(write(d, broker_argv=[exe])).broker_argv == (exe,)  # no placeholder needed
    assert load_policy(write(d, broker_argv=[])).broker_argv == ()
    (d / "plain").write_text("x")
    os.chmod(d / "plain", 0o644)
    refused(write(d, uep_argv=[str(d / "plain"), "{name}"]), f"uep_argv[0] {str(d / 'plain')!r} is not executable")
    refused(write(d, broker_argv=[str(d / "plain")]), "broker_argv[0]")
    os.mkdir(d / "adir", 0o755)  # a directory is "executable" (searchable): the regular-file rule refuses it
    refused(write(d, uep_argv=[str(d / "adir"), "{name}"]), f"uep_argv[0] {str(d / 'adir')!r} is not a regular file")
    os.chmod(d / "uep", 0o775)
    refused(write(d), "uep_argv[0]")


def test_the_policy_file_itself(d):
    refused(write(d, mode=0o664), "is writable by group or others (mode -rw-rw-r--)")
    refused(write(d, mode=0o646), "is writable by group or others")
    path = write(d)
    os.chown(path, 1, -1)
    refused(path, f"{path} is owned by uid 1, not root")
    os.mkdir(d / "pdir", 0o755)
    refused(str(d / "pdir"), f"policy file {str(d / 'pdir')!r} is not a regular file")
    refused(str(d / "missing.toml"), "cannot stat")
    refused("policy.toml", "policy file 'policy.toml' is not an absolute path")
    (d / "bad.toml").write_text("broker_user = \n")
    os.chmod(d / "bad.toml", 0o644)
    refused(str(d / "bad.toml"), str(d / "bad.toml"))


def test_symlinks_are_judged_where_they_point_and_where_they_live(d):
    target = write(d, name="real.toml")
    os.symlink(target, d / "link.toml")
    assert load_policy(str(d / "link.toml")).broker_user == "daemon"  # a link's own owner and 0777 mean nothing
    os.lchown(d / "link.toml", 1, -1)
    assert load_policy(str(d / "link.toml")).broker_user == "daemon"
    os.mkdir(d / "theirs", 0o755)
    os.chown(d / "theirs", 1, -1)
    os.symlink(target, d / "theirs" / "link.toml")
    refused(str(d / "theirs" / "link.toml"), "theirs is owned by uid 1, not root")
    (d / "theirs" / "p.toml").write_text((d / "real.toml").read_text())
    os.chmod(d / "theirs" / "p.toml", 0o644)
    os.symlink(d / "theirs" / "p.toml", d / "to-theirs.toml")
    refused(str(d / "to-theirs.toml"), "theirs is owned by uid 1, not root")
    os.mkdir(d / "gw")
    os.chmod(d / "gw", 0o775)
    shutil.copyfile(target, d / "gw" / "p.toml")
    os.chmod(d / "gw" / "p.toml", 0o644)
    refused(str(d / "gw" / "p.toml"), "gw is writable by group or others (mode drwxrwxr-x)")


def test_check_trusted_path_on_directories(d):
    check_trusted_path(str(d), "dir", want_file=False)
    with pytest.raises(PolicyError, match="is not a regular file"):
        check_trusted_path(str(d), "dir")
    check_trusted_path("/", "root", want_file=False)


def test_the_key_file(d):
    os.chmod(d / "key", 0o644)
    refused(write(d), f"key_file {d / 'key'} is readable by others")
    os.chmod(d / "key", 0o600)
    os.chown(d / "key", 1, -1)
    refused(write(d), "key_file")
    os.chown(d / "key", 0, -1)
    os.remove(d / "key")
    os.mkdir(d / "key", 0o700)
    refused(write(d), "is not a regular file")


@pytest.mark.parametrize("size", [0, 31, 33, 100])
def test_read_key_wants_exactly_32_bytes(d, size):
    (d / "key").write_bytes(b"k" * size)
    p = load_policy(write(d))
    with pytest.raises(PolicyError, match=f"key_file {d / 'key'} must hold exactly 32 bytes, has {min(size, 64)}"):
        read_key(p)
