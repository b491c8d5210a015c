"""authorize() and the environment rules, in-process, against the passwd and group entries
every Debian system has (root, daemon = uid 1, bin = uid 2, nobody): every rule at its
exact edge, without creating users or starting a helper. The same rules through the real
helper, with real test accounts: tests/test_who.py."""

import grp
import pwd
import re
from pathlib import Path

import pytest

from privhelper.authorize import Account, Refusal, authorize
from privhelper.child import build_env
from privhelper.policy import DEFAULT_ENV_DENY, FIXED_ENV, Policy
from protocol.messages import Spawn

DAEMON, BIN, ROOT_PW, NOBODY = (pwd.getpwnam(n) for n in ("daemon", "bin", "root", "nobody"))
DAEMON_GROUP = grp.getgrgid(DAEMON.pw_gid).gr_name

# the documented built-in deny-list (docs/policy.md), written out here so that a change to the code shows
DENIED_EXACT = ("GCONV_PATH", "GETCONF_DIR", "GLIBC_TUNABLES", "BASH_ENV", "ENV", "IFS", "CDPATH", "SHELLOPTS", "BASHOPTS",
                "PS4", "PROMPT_COMMAND", "NLSPATH", "LOCPATH", "HOSTALIASES", "RESOLV_HOST_CONF", "RES_OPTIONS",
                "LOCALDOMAIN", "NIS_PATH", "PERL5LIB", "PERLLIB", "PERL5OPT", "RUBYLIB", "RUBYOPT", "NODE_OPTIONS",
                "JAVA_TOOL_OPTIONS", "_JAVA_OPTIONS")
DENIED_PREFIXES = ("LD_", "PYTHON", "BASH_FUNC_", "MALLOC_")


def policy(**kw) -> Policy:
    return Policy(path="/etc/mep/policy.toml", broker_user="mep", broker_uid=999, key_file="/etc/mep/key",
                  uep_argv=("/usr/bin/true", "{name}"), **kw)


def spawn(pw, *, uid=None, env=None, name=None) -> Spawn:
    return Spawn("r1", name or pw.pw_name, pw.pw_uid if uid is None else uid, "uep", dict(env or {}), b"", ())


def ok(pw, pol, total=0, per_user=0, **kw) -> Account:
    asked = []
    account = authorize(spawn(pw, **kw), pol, total, lambda uid: asked.append(uid) or per_user)
    assert asked == [pw.pw_uid]  # the per-user count is asked for this user's uid
    return account


def refused(pw, pol, total=0, per_user=0, **kw) -> Refusal:
    with pytest.raises(Refusal) as info:
        authorize(spawn(pw, **kw), pol, total, lambda uid: per_user)
    assert str(info.value) == f"{info.value.code}: {info.value.reason}"
    return info.value


def test_the_account_comes_from_passwd():
    account = ok(DAEMON, policy(min_uid=1))
    assert account == Account(DAEMON.pw_name, DAEMON.pw_uid, DAEMON.pw_gid, DAEMON.pw_dir, DAEMON.pw_shell, (DAEMON.pw_gid,))
    assert Account.of(ROOT_PW).groups == tuple(sorted(set(__import__("os").getgrouplist("root", 0))))


def test_min_uid_at_its_edge():
    assert ok(DAEMON, policy(min_uid=1)).uid == 1  # uid == min_uid is spawned
    r = refused(DAEMON, policy(min_uid=2))
    assert (r.code, r.reason) == ("uid-below-min", "uid 1 of 'daemon' is a system account (policy min_uid=2)")
    assert refused(BIN, policy()).code == "uid-below-min"  # the default min_uid is 1000


def test_uid_zero_whatever_min_uid_says():
    r = refused(ROOT_PW, policy(min_uid=1))
    assert (r.code, r.reason) == ("uid-zero", "uid 0 is never spawned (policy min_uid=1)")


def test_max_uid_at_its_edge():
    assert ok(DAEMON, policy(min_uid=1, max_uid=1)).uid == 1  # uid == max_uid is spawned
    r = refused(BIN, policy(min_uid=1, max_uid=1))
    assert r.code == "uid-reserved" and "above policy max_uid=1" in r.reason and "uid 2 of 'bin'" in r.reason
    assert ok(BIN, policy(min_uid=1, max_uid=2)).uid == 2


def test_nobody_is_reserved_even_with_no_max_uid():
    r = refused(NOBODY, policy(min_uid=1, max_uid=2**32 - 1))
    assert r.code == "uid-reserved" and "uid 65534" in r.reason


def test_the_default_max_uid():
    assert Policy._field_defaults["max_uid"] == 2**31 - 1 and Policy._field_defaults["min_uid"] == 1000


def test_expected_uid_and_unknown_user():
    r = refused(DAEMON, policy(min_uid=1), uid=2)
    assert (r.code, r.reason) == ("uid-mismatch", "'daemon' has uid 1, the request expected 2")
    r = refused(DAEMON, policy(min_uid=1), name="mept-no-such-user-here")
    assert (r.code, r.reason) == ("unknown-user", "no local account named 'mept-no-such-user-here'")


def test_total_limit_at_its_edge():
    assert ok(DAEMON, policy(min_uid=1, max_children=2), total=1).uid == 1
    r = refused(DAEMON, policy(min_uid=1, max_children=2), total=2)
    assert (r.code, r.reason) == ("limit-total", "2 UEPs running, the limit is 2 (policy max_children)")
    assert ok(DAEMON, policy(min_uid=1), total=255).uid == 1 and refused(DAEMON, policy(min_uid=1), total=256).code == "limit-total"


def test_per_user_limit_at_its_edge():
    assert ok(DAEMON, policy(min_uid=1, max_children_per_user=2), per_user=1).uid == 1
    r = refused(DAEMON, policy(min_uid=1, max_children_per_user=2), per_user=2)
    assert (r.code, r.reason) == ("limit-user", "'daemon' has 2 UEPs running, the limit is 2 (policy max_children_per_user)")
    assert ok(DAEMON, policy(min_uid=1), per_user=3).uid == 1 and refused(DAEMON, policy(min_uid=1), per_user=4).code == "limit-user"


def test_deny_lists():
    r = refused(DAEMON, policy(min_uid=1, deny_users=frozenset({"daemon"})))
    assert (r.code, r.reason) == ("denied-user", "'daemon' is listed in policy deny_users")
    assert ok(DAEMON, policy(min_uid=1, deny_users=frozenset({"bin"}))).uid == 1
    r = refused(DAEMON, policy(min_uid=1, deny_groups=frozenset({DAEMON_GROUP, "zzz"})))
    assert r.code == "denied-group"
    assert r.reason == f"'daemon' is in group {DAEMON_GROUP!r}, listed in policy deny_groups"
    assert ok(DAEMON, policy(min_uid=1, deny_groups=frozenset({"bin"}))).uid == 1


@pytest.mark.parametrize("allow,allowed", [
    ({"allow_users": frozenset({"daemon"})}, True),
    ({"allow_users": frozenset({"bin"})}, False),
    ({"allow_groups": frozenset({DAEMON_GROUP})}, True),
    ({"allow_groups": frozenset({"bin"})}, False),
    ({"allow_users": frozenset({"bin"}), "allow_groups": frozenset({DAEMON_GROUP})}, True),
    ({"allow_users": frozenset({"daemon"}), "allow_groups": frozenset({"bin"})}, True),
    ({"allow_users": frozenset({"bin"}), "allow_groups": frozenset({"bin"})}, False),
    ({}, True),
])
def test_allow_lists(allow, allowed):
    if allowed:
        assert ok(DAEMON, policy(min_uid=1, **allow)).uid == 1
    else:
        r = refused(DAEMON, policy(min_uid=1, **allow))
        assert (r.code, r.reason) == ("not-allowed", "'daemon' is in neither policy allow_users nor allow_groups")


def test_the_built_in_deny_list_is_the_documented_one():
    assert sorted(DEFAULT_ENV_DENY) == sorted([p + "*" for p in DENIED_PREFIXES] + list(DENIED_EXACT))
    documented = Path(__file__).resolve().parent.parent.joinpath("docs", "policy.md").read_text()
    listed = re.search(r"The built-in environment deny-list: (.*?)\.\n", documented, re.S).group(1)
    assert sorted(re.findall(r"`([^`]+)`", listed)) == sorted([p + "*" for p in DENIED_PREFIXES] + list(DENIED_EXACT))


@pytest.mark.parametrize("name", [*DENIED_EXACT, *(p + "X" for p in DENIED_PREFIXES), *DENIED_PREFIXES, *FIXED_ENV,
                                  "HOME", "USER", "LOGNAME", "SHELL", "LD_PRELOAD", "PYTHONPATH", "BASH_FUNC_x%%"])
def test_each_denied_variable_is_refused(name):
    r = refused(DAEMON, policy(min_uid=1), env={name: "x"})
    assert (r.code, r.reason) == ("env-denied", f"environment variable {name!r} may not be set for a UEP (helper env "
                                  "deny-list; the administrator may allow it by name with env_allow in the helper policy)")


@pytest.mark.parametrize("name", ["LD", "PYTHO", "MY_LD_PRELOAD", "XPYTHONPATH", "ENVX", "XENV", "IFS2", "PS44", "HOMEDIR",
                                  "SHELL_X", "MALLOC", "GCONV_PATHS", "_JAVA_OPTION", "GC_USER_SDK_VERSION", "LANGUAGE"])
def test_near_names_are_allowed(name):
    assert ok(DAEMON, policy(min_uid=1), env={name: "x"}).uid == 1


def test_policy_env_deny_adds_to_the_list():
    pol = policy(min_uid=1, env_deny=DEFAULT_ENV_DENY + ("SITE_*", "EXACT"))
    assert refused(DAEMON, pol, env={"SITE_TOKEN": "x"}).code == "env-denied"
    assert refused(DAEMON, pol, env={"EXACT": "x"}).code == "env-denied"
    assert ok(DAEMON, pol, env={"EXACTLY": "x", "SITE": "y"}).uid == 1
    assert pol.env_denied("LD_PRELOAD") and not pol.env_denied("SITEX")


def test_fixed_environment_comes_from_passwd_and_pam_cannot_replace_it():
    account = ok(DAEMON, policy(min_uid=1))
    pam_env = {"HOME": "/tmp", "USER": "root", "LOGNAME": "root", "SHELL": "/tmp/evil", "LD_PRELOAD": "/tmp/x.so",
               "PYTHONPATH": "/tmp", "XDG_RUNTIME_DIR": "/run/user/1", "PATH": "/pam/bin"}
    env = build_env(account, policy(path_env="/p", lang="L"), pam_env, {"GC_A": "1"})
    assert env == {"HOME": DAEMON.pw_dir, "USER": "daemon", "LOGNAME": "daemon", "SHELL": DAEMON.pw_shell,
                   "PATH": "/pam/bin", "LANG": "L", "XDG_RUNTIME_DIR": "/run/user/1", "GC_A": "1"}
    assert build_env(account, policy(), {}, {})["PATH"] == "/usr/local/bin:/usr/bin:/bin"
    assert build_env(account, policy(), {}, {})["LANG"] == "C.UTF-8"
