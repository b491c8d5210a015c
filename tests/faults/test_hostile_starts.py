"""One user's start command never stops another user's endpoint (issue 15).

Each test runs a live MEP (the real helper in --launch mode, the broker, RabbitMQ) with a
bystander: another user's UEP, started first, which must keep its pid through every
case. A hostile start must end as that start's own refusal: a failure notice to its
user that names the value and the limit, a log line for the admin, the command acked,
and the helper, the broker and the bystander untouched.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from protocol.messages import MAX_ENV_VALUE, MAX_STDIN, Signal
from tests.rigs import procs
from tests.rigs.mep import TEMPLATE
from tests.rigs.procs import wait_for

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.usefixtures("no_strays", "rabbitmq")]
SLEEPY = {"PROBE_ACTION": json.dumps({"sleep": 600})}
# a second rule maps *@sssd.example to an SSSD-style name, which the helper's name rule refuses
IDMAP = [{"DATA_TYPE": "expression_identity_mapping#1.0.0", "mappings": [
    {"source": "{username}", "match": r"(.*)@sssd\.example", "output": "{0}@corp"},
    {"source": "{username}", "match": r"(.*)@example\.org", "output": "{0}"}]}]


class Bystander:
    """bob's UEP, running before the hostile starts; `check()` after each."""

    def __init__(self, mep):
        self.mep = mep
        mep.publish(mep.command("mept-bob@example.org"))
        [self.pid] = wait_for(lambda: list(mep.reports_now()), what="bob's UEP")
        self.broker = mep.broker_pid()

    def check(self, what: str) -> None:
        assert self.mep.proc.poll() is None, f"{what}: the helper ended:\n{self.mep.output()[-3000:]}"
        assert self.mep.broker_pid() == self.broker, f"{what}: the broker was replaced"
        assert procs.alive(self.pid), f"{what}: bob's UEP {self.pid} is gone:\n{self.mep.output()[-3000:]}"


def error_of(mep, cmd) -> str:
    notice = mep.notice(cmd)
    assert notice is not None, f"no failure notice:\n{mep.output()[-3000:]}"
    return notice["data"]["global_state"]["error"]


def started(mep, cmd) -> bool:
    return any("user endpoint started" in line and cmd["kwargs"]["name"] in line for line in mep.output().splitlines())


def outcomes(mep, cmd) -> int:
    name = cmd["kwargs"]["name"]
    return sum(1 for line in mep.output().splitlines() if name in line and (
        "user endpoint started" in line or "user endpoint not started" in line))


def test_runtime_values_at_and_over_the_environment_limit(live, accounts):
    mep = live(idmap=IDMAP, environment=SLEEPY, policy={"max_children_per_user": 10})
    bob = Bystander(mep)
    sdk = "user_runtime.globus_compute_sdk_version"
    refused = {
        "over the limit": ({"globus_compute_sdk_version": "4" * (MAX_ENV_VALUE + 1)},
                           f"{sdk} is longer than {MAX_ENV_VALUE} characters"),
        "NUL": ({"python": {"version": "3.11\x00evil"}}, "user_runtime.python.version contains NUL"),
        "lone surrogate": ({"globus_compute_sdk_version": "2.\ud800"}, f"{sdk} is not valid text"),
        "5,000 characters": ({"globus_compute_sdk_version": "x" * 5000}, f"{sdk} is longer than {MAX_ENV_VALUE}"),
    }
    for what, (runtime, words) in refused.items():
        cmd = mep.command("mept-alice@example.org", user_runtime=runtime)
        mep.publish(cmd)
        error = error_of(mep, cmd)
        assert error.startswith("Unable to start user endpoint process for mept-alice [") and words in error, \
            (what, error)
        bob.check(what)
        assert not started(mep, cmd)
    for length in (MAX_ENV_VALUE - 1, MAX_ENV_VALUE):  # at and just under the limit: served
        cmd = mep.command("mept-alice@example.org", user_runtime={"globus_compute_sdk_version": "9" * length})
        mep.publish(cmd)
        wait_for(lambda: started(mep, cmd), what=f"alice's UEP with a {length}-character version")
        bob.check(f"{length} characters")

    def lengths():  # each probe reports a moment after the broker logs its start: wait for both
        seen = [r[0]["env"].get("GC_USER_SDK_VERSION", "") for r in mep.reports_now().values()]
        return sorted(len(v) for v in seen if v.startswith("9"))
    wait_for(lambda: lengths() == [MAX_ENV_VALUE - 1, MAX_ENV_VALUE], what="both probes' reports")
    wait_for(lambda: mep.queue_depth() == 0, what="every command acked")


def test_deep_nesting_and_huge_options_and_refused_names(live, accounts):
    mep = live(idmap=IDMAP, environment=SLEEPY)
    bob = Bystander(mep)
    deep = mep.command("mept-alice@example.org")
    raw = json.dumps(deep).replace('"user_opts": {}', '"user_opts": {"x": ' + "[" * 10_000 + "]" * 10_000 + "}")
    mep.publish(raw.encode())
    assert "nested more than 100 levels deep" in error_of(mep, deep)
    bob.check("10,000-deep nesting")

    # the whole body at the depth limit (body, kwargs, user_opts, x, ...) is served; one more is refused
    def nested(levels):
        value = []
        for _ in range(levels - 4):
            value = [value]
        return value
    at_limit = mep.command("mept-alice@example.org", user_opts={"x": nested(100)})
    over = mep.command("mept-alice@example.org", user_opts={"x": nested(101)})
    mep.publish(over)
    assert "nested more than 100 levels deep" in error_of(mep, over)
    mep.publish(at_limit)
    wait_for(lambda: started(mep, at_limit) or "not started" in mep.output(), what="the 100-deep start's outcome")
    assert started(mep, at_limit), mep.output()[-2000:]
    bob.check("nesting at the limit")

    # an option the template echoes into the rendered config: the stdin document's cap
    huge = mep.command("mept-alice@example.org", user_opts={"worker_init": "y" * 600_000})
    mep.publish(huge)
    error = error_of(mep, huge)
    assert f"more than the limit of {MAX_STDIN} bytes" in error and "rendered user endpoint configuration" in error
    bob.check("a 600 KB option")
    fits = mep.command("mept-alice@example.org", user_opts={"worker_init": "y" * 500_000})
    mep.publish(fits)
    wait_for(lambda: started(mep, fits), what="alice's UEP with a 500 KB option")
    bob.check("a 500 KB option")

    sssd = mep.command("mept-alice@sssd.example")  # maps to mept-alice@corp
    mep.publish(sssd)
    error = error_of(mep, sssd)
    assert error.startswith("Unable to start user endpoint process for mept-alice@corp [the local user name "), error
    assert "does not match" in error
    bob.check("an SSSD-style name")
    wait_for(lambda: mep.queue_depth() == 0, what="every command acked")
    for cmd in (deep, over, at_limit, huge, fits, sssd):
        assert outcomes(mep, cmd) <= 1


def test_environment_file_names_values_and_frame_size(live, accounts):
    mep = live(environment=SLEEPY)
    bob = Bystander(mep)
    base = json.loads((mep.dir / "user_environment.yaml").read_text())
    cases = {
        "a name with a dash": ({**base, "MY-VAR": "1"}, "'MY-VAR' does not match"),
        "too many variables": ({**base, **{f"V{i}": "1" for i in range(70)}}, "more than the limit of 64"),
        "a value over the limit": ({**base, "BIG": "z" * (MAX_ENV_VALUE + 1)}, "BIG is longer than 4096"),
    }
    for what, (env, words) in cases.items():
        mep.write("user_environment.yaml", json.dumps(env))
        cmd = mep.command("mept-alice@example.org")
        mep.publish(cmd)
        error = error_of(mep, cmd)
        assert "user environment file is broken" in error and words in error, (what, error)
        assert "user_environment.yaml" in mep.output()
        bob.check(what)
    # every value within its limit, but escaped control characters make the frame over 1 MiB:
    # the session's own check refuses it before it takes a sequence number
    mep.write("user_environment.yaml", json.dumps({**base, **{f"C{i}": "\x01" * MAX_ENV_VALUE for i in range(50)}}))
    cmd = mep.command("mept-alice@example.org")
    mep.publish(cmd)
    error = error_of(mep, cmd)
    assert "outside 1..1048576" in error, error
    bob.check("a frame over 1 MiB")
    mep.write("user_environment.yaml", json.dumps(base))
    after = mep.command("mept-carol@example.org")  # the next request's sequence number is still right
    mep.publish(after)
    wait_for(lambda: started(mep, after), what="carol's UEP after the refusals")
    bob.check("the start after")


def test_an_unexpected_error_sends_a_notice_with_a_reference(live, accounts):
    """An error no rule foresaw (here: the admin's template divides by zero) refuses that
    start with a notice whose reference finds the traceback in the log."""
    template = TEMPLATE + "{% if boom is defined %}x: {{ 1 // 0 }}{% endif %}\n"
    mep = live(template=template, environment=SLEEPY)
    bob = Bystander(mep)
    cmd = mep.command("mept-alice@example.org", user_opts={"boom": 1})
    mep.publish(cmd)
    error = error_of(mep, cmd)
    assert "the administrator's log has the details, reference " in error
    reference = error.rsplit(" ", 1)[1]
    log = mep.output()
    assert reference in log and "ZeroDivisionError" in log[log.index(reference):]
    assert "was answered" not in log
    bob.check("an unexpected error")
    wait_for(lambda: mep.queue_depth() == 0, what="the command acked")


def test_a_second_start_of_the_same_endpoint_is_refused(live, accounts):
    mep = live(environment=SLEEPY)
    bob = Bystander(mep)
    second = mep.launch(open(mep.dir / "second.log", "w"))
    assert procs.reap(second, 30) != 0
    said = (mep.dir / "second.log").read_text()
    assert f"already running (broker pid {bob.broker}" in said, said
    bob.check("a second start")
    status = mep.mepctl("status", "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["pid"] == bob.broker, status
    # the same registration from another directory: the command queue is taken
    other = live(environment=SLEEPY)
    other.stop()
    (other.dir / "registration.json").write_text((mep.dir / "registration.json").read_text())
    other.helper_log = open(other.helper_log_path, "a")
    other.proc = other.launch(other.helper_log)
    assert procs.reap(other.proc, 30) != 0
    assert "another MEP is consuming this endpoint's command queue" in other.output()
    bob.check("the same registration elsewhere")
    # a MEP killed outright leaves a lock that does not block the next start
    os.kill(mep.proc.pid, signal.SIGKILL)
    procs.reap(mep.proc, 10)
    procs.wait_gone([bob.pid, bob.broker], 10)
    mep.relaunch()
    assert mep.broker_pid() != bob.broker


def test_a_command_interrupted_twice_is_refused_not_retried_forever(live, accounts, pam):
    """The broker dies twice while one start is in hand: the first redelivery is its retry,
    the second is refused with a notice and acked, and the next start is served."""
    pam["hold"].touch()  # bob's PAM account step waits until released: the start stays in hand
    mep = live(policy=pam["policy"])
    cmd = mep.command("mept-bob@example.org")
    mep.publish(cmd)
    try:
        for attempt in (1, 2):
            wait_for(lambda: pam["marker"].exists() and len(pam["marker"].read_text().split()) == attempt,
                     what=f"bob's PAM step, attempt {attempt}")
            os.kill(mep.broker_pid(), signal.SIGKILL)
            procs.reap(mep.proc, 15)
            assert mep.queue_depth() == 1  # not acked: back in the queue
            mep.relaunch()
        error = error_of(mep, cmd)
        assert "stopped twice while it handled this start request" in error
        assert "not tried again" in mep.output()
        wait_for(lambda: mep.queue_depth() == 0, what="the refused command acked")
        assert len(pam["marker"].read_text().split()) == 2  # no third attempt reached the helper
    finally:
        pam["release"].touch()
    alice = mep.command("mept-alice@example.org")
    mep.publish(alice)
    wait_for(lambda: started(mep, alice), what="the next start")


RACE_ROUNDS, RACE_SECONDS = 2000, 50  # whichever comes first (issue 15: "2,000 iterations or 60 s")


def test_signals_racing_uep_exits_never_end_the_helper(helpers, accounts, rigdir, record_property):
    """A TERM, HUP or KILL for a UEP that has just exited, but whose exit the helper has
    not yet read, is that request's refusal ("already-exited"), never the helper's end.
    Looped for a bounded time (up to RACE_ROUNDS rounds or RACE_SECONDS s); another user's
    UEP, running throughout, keeps its pid."""
    helper, client = helpers(uep_argv=[str(rigdir.probe), "start", "{name}"], max_children=50,
                             max_children_per_user=50)
    bystander = client.spawn(accounts.bob, name="bystander", stdin=json.dumps({"sleep": 600}).encode(), channels=())
    assert bystander.type == "spawned", bystander
    deadline, rounds, outcomes_seen = time.monotonic() + RACE_SECONDS, 0, {}
    while rounds < RACE_ROUNDS and time.monotonic() < deadline:
        rounds += 1
        reply = client.spawn(accounts.alice, name=f"race{rounds}", stdin=json.dumps({"exit": 0}).encode(),
                             channels=())
        assert reply.type == "spawned", reply
        for sig in ("TERM", "HUP", "KILL", "TERM"):
            req = client.req_id()
            client.request(Signal(req, reply.pid, sig))
            answer = client.reply(req)
            outcome = answer.code if answer.type == "refused" else answer.type
            outcomes_seen[outcome] = outcomes_seen.get(outcome, 0) + 1
            assert answer.type == "signaled" or answer.code in ("already-exited", "not-our-child"), answer
        client.wait_exited(reply.pid)
    record_property("race_rounds", rounds)
    print(f"signal race: {rounds} rounds, outcomes {outcomes_seen}")
    assert helper.proc.poll() is None, helper.output()[-3000:]
    assert procs.alive(bystander.pid), f"the bystander UEP {bystander.pid} is gone after {rounds} rounds"
    assert not [e for e in client.events if e.TYPE == "exited" and e.pid == bystander.pid], "the bystander exited"
    assert "already-exited" in outcomes_seen, (rounds, outcomes_seen)  # the race was really run
