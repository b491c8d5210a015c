"""What the spawned UEP sees from the inside (SECURITY-REVIEW 10-13), read from the
probe's own /proc/self/status, /proc/self/fd and getres*id."""

import json
import os
import re
import signal

import pytest

from broker.protocol_session import InvalidRequest
from protocol.messages import ENV_NAME_RE, Spawn, to_wire
from tests.rigs import procs
from tests.rigs.helper import read_report

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("no_strays")]
ZERO = "0000000000000000"


def spawn_and_report(client, user, **kw):
    reply = client.spawn(user, **kw)
    assert reply.type == "spawned", reply
    report = read_report(reply.fds["audit"])
    return reply, report


def test_ids_groups_caps_nnp_session_umask_without_pam(helpers, accounts):
    """13: uids, gids, groups are the user's; setuid(0) fails; no capabilities at all;
    NoNewPrivs=1 without PAM; a session leader; umask 077; cwd is home; no signal blocked
    and none ignored but the two Python itself ignores (the helper and the session
    process block and ignore some; none of that may reach the UEP)."""
    helper, client = helpers()
    bob = accounts.bob
    reply, seen = spawn_and_report(client, bob)
    assert seen["pid"] == reply.pid
    assert seen["resuid"] == [bob.pw_uid] * 3
    assert seen["resgid"] == [bob.pw_gid] * 3
    assert seen["groups"] == sorted(os.getgrouplist(bob.pw_name, bob.pw_gid))
    assert len(seen["groups"]) == 2  # primary + mept-science: initgroups really ran
    assert seen["setuid0"].startswith("failed")
    assert seen["caps"] == {"CapInh": ZERO, "CapPrm": ZERO, "CapEff": ZERO, "CapBnd": ZERO, "CapAmb": ZERO}
    assert seen["no_new_privs"] == 1
    python_ignores = (1 << (signal.SIGPIPE - 1)) | (1 << (signal.SIGXFSZ - 1))
    assert seen["signals"] == {"SigBlk": ZERO, "SigIgn": f"{python_ignores:016x}"}
    assert seen["sid"] == seen["pid"] == seen["pgid"]
    assert seen["umask"] == 0o077
    assert seen["cwd"] == bob.pw_dir
    assert client.wait_exited(reply.pid).status == 0


def test_only_expected_fds_are_open(helpers, accounts):
    """12: fds 0-2 plus the requested side channels, nothing inherited from the helper."""
    helper, client = helpers()
    _, seen = spawn_and_report(client, accounts.alice, channels=("cred", "audit"))
    assert sorted(int(fd) for fd in seen["fds"]) == [0, 1, 2, 3, 4]
    assert seen["fds"]["1"] == seen["fds"]["2"] == "/dev/null"
    assert seen["fds"]["0"].startswith("/memfd:mep-stdin")
    assert seen["fds"]["3"].startswith("/memfd:mep-cred")
    assert seen["fds"]["4"].startswith("pipe:")
    _, seen = spawn_and_report(client, accounts.alice, name="uep2", channels=("audit",))
    assert sorted(int(fd) for fd in seen["fds"]) == [0, 1, 2, 4]


def test_stdin_payload_and_credential_refresh(helpers, accounts):
    """The payload arrives on stdin; the UEP cannot write it; the broker's cred memfd
    reaches the UEP, which sees a later refresh."""
    helper, client = helpers()
    payload = json.dumps({"cred_wait": 5, "hello": "wörld"})
    reply, seen = spawn_and_report(client, accounts.alice, stdin=payload.encode())
    assert seen["stdin"] == payload
    assert seen["cred"] == ""
    os.pwrite(reply.fds["cred"], b'{"token": "fresh"}', 0)
    again = read_report(reply.fds["audit"])
    assert again["cred"] == '{"token": "fresh"}'
    # the UEP got read-only ends and cannot reopen either memfd for writing through /proc
    assert seen["reopen_write"] == {"0": "Permission denied", "3": "Permission denied"}
    assert client.wait_exited(reply.pid).status == 0


def test_argv_is_policy_command_plus_name(helpers, accounts, rigdir):
    """10: argv is exactly the policy's uep_argv with {name} replaced, nothing else."""
    helper, client = helpers(uep_argv=[str(rigdir.probe), "start", "--fixed-flag", "{name}", "--die-with-parent"])
    _, seen = spawn_and_report(client, accounts.alice, name="my.uep-1")
    assert seen["argv"] == [str(rigdir.probe), "start", "--fixed-flag", "my.uep-1", "--die-with-parent"]


@pytest.mark.parametrize("name", ["../x", "a/b", "-rf", "x\ny", "a\x00b", "", "x" * 129, ".hidden", "a..b"])
def test_bad_uep_names_end_the_connection(helpers, accounts, name):
    """7: a name that could become a path, an option or a second line is refused by the
    decoder (fatal: the broker is broken or hostile) and nothing is spawned."""
    helper, client = helpers()
    client.send_unchecked({"type": "spawn", "req": "x1", "username": accounts.alice.pw_name,
                           "uid": accounts.alice.pw_uid, "name": name, "env": {}, "stdin": "", "channels": []})
    assert helper.wait() == 2
    assert "spawn.name" in helper.output()
    assert procs.processes_of(accounts.alice.pw_name) == []


def test_environment_is_built_from_nothing(helpers, accounts, rigdir):
    """11: only HOME USER LOGNAME SHELL PATH LANG and the broker's allowed additions."""
    os.environ["LD_PRELOAD"] = "/tmp/evil.so"  # the helper must not pass its own env on
    try:
        helper, client = helpers(path="/usr/bin:/bin", lang="C.UTF-8")
    finally:
        del os.environ["LD_PRELOAD"]
    alice = accounts.alice
    _, seen = spawn_and_report(client, alice, env={"GC_TASK_QUEUE": "q1", "X": "y z"})
    assert seen["env"] == {
        "HOME": alice.pw_dir, "USER": alice.pw_name, "LOGNAME": alice.pw_name, "SHELL": alice.pw_shell,
        "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "GC_TASK_QUEUE": "q1", "X": "y z",
    }


@pytest.mark.parametrize("var", ["LD_PRELOAD", "LD_LIBRARY_PATH", "PYTHONPATH", "PYTHONSTARTUP", "GCONV_PATH",
                                 "BASH_ENV", "ENV", "IFS", "GLIBC_TUNABLES", "BASH_FUNC_ls%%", "HOME", "USER", "EXTRA_DENIED"])
def test_denied_environment_is_refused(helpers, accounts, var):
    """11: a denied variable is never passed; the spawn is refused with a reason naming it
    (or, for names no variable may have, the decoder ends the connection)."""
    helper, client = helpers(env_deny=["EXTRA_*"])
    if not ENV_NAME_RE.fullmatch(var):  # BASH_FUNC_ls%%: no variable may have this name
        with pytest.raises(InvalidRequest, match="does not match"):  # the broker's session does not send it,
            client.spawn(accounts.alice, env={var: "x"})
        alice = accounts.alice  # and a broker that sends it all the same loses the connection
        client.send_unchecked(to_wire(Spawn("t1", alice.pw_name, alice.pw_uid, "uep1", {var: "x"}, b"", ())))
        assert helper.wait() == 2 and "does not match" in helper.output()
        return
    reply = client.spawn(accounts.alice, env={var: "x"})
    assert reply.type == "refused"
    assert reply.code == "env-denied" and var in reply.reason
    assert procs.processes_of(accounts.alice.pw_name) == []


def test_the_administrator_may_allow_denied_variables_by_name(helpers, accounts, rigdir):
    """The seed's site environment (module-provided libraries): user_environment.yaml may
    set LD_LIBRARY_PATH or PYTHONPATH once the root policy names them in env_allow; the
    rest of the deny-list, and HOME, USER, LOGNAME and SHELL, stay the helper's."""
    helper, client = helpers(env_allow=["LD_LIBRARY_PATH", "PYTHONPATH"])
    _, seen = spawn_and_report(client, accounts.alice, env={"LD_LIBRARY_PATH": "/opt/site/lib", "PYTHONPATH": "/opt/p"})
    assert seen["env"]["LD_LIBRARY_PATH"] == "/opt/site/lib" and seen["env"]["PYTHONPATH"] == "/opt/p"
    reply = client.spawn(accounts.alice, env={"LD_PRELOAD": "/opt/site/lib/x.so"})
    assert reply.type == "refused" and reply.code == "env-denied" and "env_allow" in reply.reason
    helper, client = helpers(env_allow=["HOME"], handshake=False)
    assert helper.wait() == 78 and "env_allow may not name HOME" in helper.output()


@pytest.mark.parametrize("syscall,words", [
    ("setresuid", r"ids after the drop are \(0, 0, 0\)"),
    ("setresgid", r"ids after the drop are \(\d+, \d+, \d+\)/\(0, 0, 0\)"),
    ("setgroups", "groups after the drop are"),
    ("setuid", r"setuid\(0\) succeeded after the drop"),
    ("prctl", "capabilities left after the drop: {'CapBnd'"),  # the bounding set was not dropped
])
def test_a_drop_the_kernel_did_not_make_is_refused_before_exec(helpers, accounts, syscall, words):
    """13: each step of the drop is checked after it is made. strace makes the kernel report
    success for one step without making it; the spawn is refused as setup-failed with what
    the check saw, no UEP runs, and the helper serves on."""
    helper, client = helpers()
    with procs.strace_holding(helper.proc.pid, syscall, "retval=0", follow=True):  # it reports success, does nothing
        reply = client.spawn(accounts.alice)
    assert (reply.type, reply.code) == ("refused", "setup-failed"), reply
    assert re.search(words, reply.reason), reply.reason
    assert procs.processes_of(accounts.alice.pw_name) == []
    reply, seen = spawn_and_report(client, accounts.alice, name="after")  # untraced: the drop is whole again
    assert seen["resuid"] == [accounts.alice.pw_uid] * 3 and seen["setuid0"].startswith("failed")
    assert client.wait_exited(reply.pid).status == 0
