"""The real helper's bookkeeping at its edges: it leaks no fd over a UEP's life or a
refusal, answers each request once, and a spawn that meets the helper's own resource
limit (RLIMIT_NOFILE, set on the running helper with prlimit) is that spawn's refusal
(`helper-resources`), never the end of the helper or of another user's UEP."""

import json
import os
import resource

import pytest

from protocol.messages import Ping

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("no_strays")]
SLEEP = json.dumps({"sleep": 600}).encode()


def helper_fds(helper) -> int:
    return len(os.listdir(f"/proc/{helper.proc.pid}/fd"))


def ping(client):
    """A ping's pong, and every event that came before it (none may be a second answer)."""
    req = client.req_id()
    client.request(Ping(req))
    assert client.reply(req).type == "pong"


def test_no_fd_is_left_after_a_uep_ends(helpers, accounts):
    helper, client = helpers()
    ping(client)
    before = helper_fds(helper)
    for channels in ((), ("cred",), ("cred", "audit")):
        reply = client.spawn(accounts.alice, name="uep1", stdin=json.dumps({"exit": 0}).encode(), channels=channels)
        assert reply.type == "spawned", reply
        client.wait_exited(reply.pid)
        ping(client)
        assert helper_fds(helper) == before, (channels, os.listdir(f"/proc/{helper.proc.pid}/fd"))


def test_a_session_refusal_is_answered_once_and_leaks_no_fd(helpers, accounts, rigdir):
    """A UEP program the kernel cannot exec (ENOEXEC): the session process refuses, the
    helper answers that request once, closes the fds it made for it, and serves on."""
    garbage = rigdir.file("not-a-program", "this is not a script\n", mode=0o755)
    helper, client = helpers(uep_argv=[str(garbage), "{name}"])
    ping(client)
    before = helper_fds(helper)
    for _ in range(2):
        reply = client.spawn(accounts.alice, name="uep1")
        assert reply.type == "refused" and reply.code != "internal", reply
        ping(client)
        ping(client)  # the session process has ended by now or soon: a second answer would be in events
    assert not [e for e in client.events if getattr(e, "req", None)], client.events
    assert helper_fds(helper) == before, os.listdir(f"/proc/{helper.proc.pid}/fd")
    assert helper.proc.poll() is None


def test_out_of_fds_is_that_spawns_refusal(helpers, accounts):
    helper, client = helpers(max_children_per_user=5)
    bystander = client.spawn(accounts.bob, name="bystander", stdin=SLEEP, channels=())
    assert bystander.type == "spawned", bystander
    ping(client)
    before = helper_fds(helper)
    limits = resource.prlimit(helper.proc.pid, resource.RLIMIT_NOFILE)
    for spare in range(4):  # 0: memfd_create fails; then the cred memfd, the audit pipe, the status pipe
        resource.prlimit(helper.proc.pid, resource.RLIMIT_NOFILE, (before + spare, limits[1]))
        try:
            reply = client.spawn(accounts.alice, name="uep1", stdin=SLEEP)
        finally:
            resource.prlimit(helper.proc.pid, resource.RLIMIT_NOFILE, limits)
        assert reply.type == "refused" and reply.code == "helper-resources", (spare, reply)
        assert "cannot start a session process" in reply.reason, reply
        assert helper_fds(helper) == before, (spare, os.listdir(f"/proc/{helper.proc.pid}/fd"))
    assert "code=helper-resources" in helper.output()
    reply = client.spawn(accounts.alice, name="uep1", stdin=SLEEP)  # with the limit back, the same spawn starts
    assert reply.type == "spawned", reply
    assert helper.proc.poll() is None
    assert os.path.exists(f"/proc/{bystander.pid}") and not [e for e in client.events if e.TYPE == "exited"]
