"""The real helper's bookkeeping at its edges: it leaks no fd over a UEP's life or a
refusal, answers each request once, and a spawn that meets the helper's own resource
limit (RLIMIT_NOFILE, set on the running helper with prlimit) is that spawn's refusal
(`helper-resources`), never the end of the helper or of another user's UEP."""

import json
import os
import resource
import subprocess

import pytest

from protocol.messages import Ping, Signal
from tests.rigs import procs
from tests.rigs.procs import wait_for

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
    # the refusal line comes before the session process's end: the helper closes that
    # session's status pipe when it sees the end, which may come after the pings' answers
    try:
        wait_for(lambda: helper_fds(helper) == before, timeout=10, what="the helper to close the session's fds")
    except AssertionError:
        raise AssertionError(os.listdir(f"/proc/{helper.proc.pid}/fd")) from None
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


def fd_links(pid: int) -> dict:
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[int(fd)] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            pass
    return out


def test_the_session_process_keeps_no_copy_of_the_ueps_channels(helpers, accounts):
    """Once the UEP has its stdin, cred and audit fds, the session process (the UEP's
    parent, which waits for it) holds none of them: the UEP's end of the audit pipe is
    the UEP's alone, and nothing but the UEP keeps its stdin or credential memfd."""
    helper, client = helpers()
    reply = client.spawn(accounts.alice, name="uep1", stdin=SLEEP)
    assert reply.type == "spawned", reply
    with open(f"/proc/{reply.pid}/status") as f:
        session = int(next(line.split()[1] for line in f if line.startswith("PPid:")))
    uep = {link for fd, link in fd_links(reply.pid).items() if fd == 0 or fd >= 3}
    assert any("mep-stdin" in link for link in uep) and any("mep-cred" in link for link in uep), uep
    assert any(link.startswith("pipe:") for link in uep), uep  # the audit pipe's write end
    kept = uep & set(fd_links(session).values())
    assert not kept, f"the session process {session} still holds {kept}"


def test_a_signal_for_a_pid_the_helper_did_not_start_is_refused_while_uep_run(helpers, accounts):
    """With UEPs running, a signal for another process group (here a root `sleep` of the
    test's own) is refused as not-our-child and reaches nobody; the UEPs run on."""
    helper, client = helpers()
    ueps = [client.spawn(accounts.bob, name="bystander", stdin=SLEEP), client.spawn(accounts.alice, name="uep1", stdin=SLEEP)]
    assert all(r.type == "spawned" for r in ueps), ueps
    stranger = subprocess.Popen(["sleep", "600"], start_new_session=True)
    try:
        for sig in ("TERM", "KILL", "HUP"):
            req = client.req_id()
            client.request(Signal(req, stranger.pid, sig))
            answer = client.reply(req)
            assert answer.type == "refused" and answer.code == "not-our-child", answer
        assert stranger.poll() is None, "the signal reached a process the helper did not start"
        for r in ueps:
            assert os.path.exists(f"/proc/{r.pid}"), r
        req = client.req_id()  # and the UEP it did start is signalled
        client.request(Signal(req, ueps[1].pid, "TERM"))
        assert client.reply(req).type == "signaled"
        assert f"signal TERM to UEP group {ueps[1].pid} of {accounts.alice.pw_name}" in helper.output()  # the admin's record
        client.wait_exited(ueps[1].pid)
        assert os.path.exists(f"/proc/{ueps[0].pid}")
    finally:
        stranger.kill()
        stranger.wait()


def test_a_broker_that_stops_reading_is_cut_off_after_io_timeout(helpers, accounts):
    """SECURITY.md's fatal list: a broker that does not read for io_timeout_seconds is stuck
    or gone. It sends pings and never reads the pongs; once they fill the socket, the helper's
    send waits io_timeout (1 s here) and the helper ends (exit 2) with its UEP stopped. It
    must never block for ever: then the UEP would outlive any stop, and so would the root process."""
    helper, client = helpers(io_timeout_seconds=1)
    reply = client.spawn(accounts.alice, stdin=SLEEP)
    assert reply.type == "spawned", reply
    client.sock.settimeout(60)
    try:
        for _ in range(200_000):  # about 3,000 fill the buffers of both ends
            client.request(Ping(client.req_id()))
        pytest.fail("200,000 pings were read without a pong being read")
    except (BrokenPipeError, ConnectionResetError):
        pass  # the helper gave up and closed the connection
    except TimeoutError:
        pytest.fail(f"the helper blocked in its send for 60 s instead of io_timeout:\n{helper.output()}")
    assert helper.wait(30) == 2
    assert "TimeoutError" in helper.output()
    assert procs.wait_gone([reply.pid]) == []


def test_session_processes_are_in_groups_of_their_own_and_titled_once_the_endpoint_is_named(helpers, accounts):
    """A session process leaves the helper's process group (a terminal's Ctrl+C is for the
    helper, which asks the broker to stop: SECURITY.md's signal rules), and `ps` tells it from
    the helper only once the broker has named the endpoint: before the title request it
    keeps the helper's command line, after it it says whose session it is."""
    from protocol.messages import Title
    helper, client = helpers()

    def session_of(reply) -> int:
        assert reply.type == "spawned", reply
        return int(procs.proc_status_field(reply.pid, "PPid"))

    def cmdline(pid: int) -> str:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().rstrip(b"\0").replace(b"\0", b" ").decode()

    before = session_of(client.spawn(accounts.alice, stdin=SLEEP, name="before"))
    assert os.getpgid(before) == before != os.getpgid(helper.proc.pid)
    assert cmdline(before) == cmdline(helper.proc.pid)  # untitled: the helper's own argv
    req = client.req_id()
    client.request(Title(req, "0123abcd-4567-89ef-0123-456789abcdef", "demo"))
    assert client.reply(req).type == "pong"
    title = "Globus Compute Endpoint *(0123abcd-4567-89ef-0123-456789abcdef, demo)"
    assert cmdline(helper.proc.pid).startswith(f"{title} [root helper]")
    after = session_of(client.spawn(accounts.bob, stdin=SLEEP, name="after"))
    assert os.getpgid(after) == after
    assert cmdline(after).startswith(f"{title} [session of {accounts.bob.pw_name}]")
    assert cmdline(before) != cmdline(after)
