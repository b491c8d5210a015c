"""PAM in the per-UEP session process (SECURITY-REVIEW 14), with real modules and
service files under /etc/pam.d created for the test."""

import grp
import json
import os

import pytest

from tests.rigs import procs
from tests.rigs.accounts import PAM_DIR, PREFIX, pam_service
from tests.rigs.helper import read_report

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("no_strays")]


@pytest.fixture(scope="module")
def pamrig(rigdir, accounts):
    log = rigdir.path / "pam-session.log"
    hook = rigdir.file("pam-hook.sh", f'#!/bin/sh\necho "$PAM_TYPE $PAM_USER $PAM_SERVICE" >> {log}\n', mode=0o755)
    limits = rigdir.file("limits.conf", f"{accounts.alice.pw_name} soft nofile 64\n{accounts.alice.pw_name} hard nofile 64\n")
    nologin = rigdir.path / "nologin"
    services = {
        "full": pam_service("full", f"""auth     required pam_permit.so
account  required pam_unix.so
account  required pam_shells.so
session  required pam_exec.so {hook}
session  required pam_limits.so conf={limits}
"""),
        "deny": pam_service("deny", "auth required pam_permit.so\naccount required pam_deny.so\n"),
        "nologin": pam_service("nologin", f"auth required pam_permit.so\naccount required pam_nologin.so file={nologin}\naccount required pam_permit.so\n"),
    }
    return {"log": log, "nologin_file": nologin, **services}


def pam_policy(rigdir, service, **kw):
    return rigdir.policy(pam={"enabled": True, "service": service, **kw.pop("pam", {})}, **kw)


def lines(path):
    return path.read_text().splitlines() if path.exists() else []


def test_session_is_open_while_the_uep_runs_and_closed_after(helpers, accounts, rigdir, pamrig):
    helper, client = helpers(pam_policy(rigdir, pamrig["full"]))
    before = len(lines(pamrig["log"]))
    reply = client.spawn(accounts.alice, stdin=b'{"sleep": 1}')
    assert reply.type == "spawned", reply
    seen = read_report(reply.fds["audit"])
    user = accounts.alice.pw_name
    assert lines(pamrig["log"])[before:] == [f"open_session {user} {pamrig['full']}"]  # open, not yet closed
    assert client.wait_exited(reply.pid).status == 0
    assert lines(pamrig["log"])[before:] == [f"open_session {user} {pamrig['full']}", f"close_session {user} {pamrig['full']}"]
    assert seen["no_new_privs"] == 0  # with PAM, NO_NEW_PRIVS is policy and off by default
    assert seen["caps"]["CapEff"] == seen["caps"]["CapPrm"] == "0000000000000000"
    # and the bounding set is left as a login's is, for setuid programs (keep_bounding_set, below)
    assert seen["caps"]["CapBnd"] == procs.proc_status_field(helper.proc.pid, "CapBnd")


SETUID_BIND = r"""
#include <arpa/inet.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
int main(void) {  /* a reserved port needs CAP_NET_BIND_SERVICE, as a scheduler's setuid helper might */
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(1)};
    int s = socket(AF_INET, SOCK_STREAM, 0);
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    int rc = bind(s, (struct sockaddr *)&a, sizeof a);
    printf("euid=%d bind=%s\n", (int)geteuid(), rc == 0 ? "ok" : strerror(errno));
    return rc != 0;
}
"""


@pytest.fixture
def setuid_bind(rigdir):
    """A setuid-root program that binds a reserved port (the seed: "If your site requires
    use of SETUID executables, then PAM must be enabled")."""
    source, binary = rigdir.path / "setuid-bind.c", rigdir.path / f"setuid-bind-{os.urandom(3).hex()}"
    source.write_text(SETUID_BIND)
    procs.run("gcc", "-O1", "-o", str(binary), str(source))
    os.chmod(binary, 0o4755)
    yield binary
    binary.unlink()


@pytest.mark.parametrize("keep, expected", [(None, "euid=0 bind=ok"), (False, "euid=0 bind=Permission denied")])
def test_with_pam_a_setuid_program_keeps_its_capabilities_unless_the_policy_is_strict(
        helpers, accounts, rigdir, pamrig, setuid_bind, keep, expected):
    pam = {} if keep is None else {"keep_bounding_set": keep}
    helper, client = helpers(pam_policy(rigdir, pamrig["full"], pam=pam))
    reply = client.spawn(accounts.alice, stdin=json.dumps({"run": [str(setuid_bind)]}).encode())
    assert reply.type == "spawned", reply
    seen = read_report(reply.fds["audit"])
    ran = read_report(reply.fds["audit"])["run"]
    assert ran["stdout"].strip() == expected, ran
    assert seen["caps"]["CapEff"] == "0000000000000000"  # the UEP itself has none either way
    client.wait_exited(reply.pid)


def test_without_pam_or_with_no_new_privs_a_setuid_program_gets_nothing(helpers, accounts, rigdir, pamrig,
                                                                        setuid_bind):
    for policy in (rigdir.policy(), pam_policy(rigdir, pamrig["full"], pam={"no_new_privs": True})):
        helper, client = helpers(policy)
        reply = client.spawn(accounts.alice, stdin=json.dumps({"run": [str(setuid_bind)]}).encode())
        seen = read_report(reply.fds["audit"])
        assert seen["caps"]["CapBnd"] == "0000000000000000" and seen["no_new_privs"] == 1
        ran = read_report(reply.fds["audit"])["run"]
        assert ran["stdout"].strip().startswith(f"euid={accounts.alice.pw_uid} "), ran  # NO_NEW_PRIVS: no setuid
        client.wait_exited(reply.pid)


def test_pam_limits_act_on_the_session_not_the_helper(helpers, accounts, rigdir, pamrig):
    helper, client = helpers(pam_policy(rigdir, pamrig["full"]))
    limits_path = f"/proc/{helper.proc.pid}/limits"
    before = open(limits_path).read()
    reply = client.spawn(accounts.alice, stdin=b'{"sleep": 1}')
    seen = read_report(reply.fds["audit"])
    assert seen["nofile_soft"] == "64"  # pam_limits applied to the UEP...
    assert open(limits_path).read() == before  # ...and not to the long-lived helper
    assert "Max open files            64" not in before
    client.wait_exited(reply.pid)


def test_no_new_privs_with_pam_is_policy(helpers, accounts, rigdir, pamrig):
    helper, client = helpers(pam_policy(rigdir, pamrig["full"], pam={"no_new_privs": True}))
    reply = client.spawn(accounts.alice)
    assert read_report(reply.fds["audit"])["no_new_privs"] == 1


def test_account_denied(helpers, accounts, rigdir, pamrig):
    helper, client = helpers(pam_policy(rigdir, pamrig["deny"]))
    reply = client.spawn(accounts.alice)
    assert reply.type == "refused"
    assert reply.code == "pam-acct-mgmt"
    assert f"PAM service '{pamrig['deny']}' refused 'mept-alice'" in reply.reason
    assert "code=pam-acct-mgmt" in helper.output()


def test_shell_not_in_etc_shells(helpers, accounts, rigdir, pamrig):
    helper, client = helpers(pam_policy(rigdir, pamrig["full"]))
    reply = client.spawn(accounts.badshell)
    assert reply.type == "refused" and reply.code == "pam-acct-mgmt", reply
    ok = client.spawn(accounts.alice)
    assert ok.type == "spawned"


def test_nologin_message_reaches_the_caller(helpers, accounts, rigdir, pamrig):
    pamrig["nologin_file"].write_text("Down for maintenance until 14:00\n")
    try:
        helper, client = helpers(pam_policy(rigdir, pamrig["nologin"]))
        reply = client.spawn(accounts.alice)
        assert reply.type == "refused" and reply.code == "pam-acct-mgmt"
        assert "Down for maintenance until 14:00" in reply.reason, reply
    finally:
        pamrig["nologin_file"].unlink()
    ok = client.spawn(accounts.alice, name="after")
    assert ok.type == "spawned", ok  # the file is gone: allowed again


def test_groups_are_those_authorized_not_looked_up_again(helpers, accounts, rigdir):
    """The UEP gets exactly the groups the helper checked (setgroups of the authorized
    list, not initgroups at the drop): here a PAM account step puts carol into the
    denied group after the check and before the drop; her UEP must not be in it."""
    carol, denygrp = accounts.carol, grp.getgrnam(PREFIX + "denygrp")
    hook = rigdir.file("pam-addgroup.sh", f"#!/bin/sh\ngpasswd -a {carol.pw_name} {denygrp.gr_name} >/dev/null\n", mode=0o755)
    service = pam_service("addgroup", f"account required pam_exec.so {hook}\naccount required pam_unix.so\n")
    try:
        helper, client = helpers(pam_policy(rigdir, service, deny_groups=[denygrp.gr_name]))
        reply = client.spawn(carol)
        assert reply.type == "spawned", reply
        seen = read_report(reply.fds["audit"])
        assert denygrp.gr_gid in os.getgrouplist(carol.pw_name, carol.pw_gid)  # the account step did add her
        assert seen["groups"] == [carol.pw_gid]
        assert client.wait_exited(reply.pid).status == 0
        refused = client.spawn(carol, name="uep2")  # checked again, she is refused now
        assert (refused.type, refused.code) == ("refused", "denied-group"), refused
    finally:
        procs.run("gpasswd", "-d", carol.pw_name, denygrp.gr_name, check=False)
        (PAM_DIR / service).unlink(missing_ok=True)
