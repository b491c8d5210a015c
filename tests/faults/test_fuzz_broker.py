"""Random start commands (hypothesis) against a live broker (issue 7): real helper, real
broker, real RabbitMQ, the probe as UEP. Commands are upstream's format with fields
dropped, retyped or replaced, hostile identities and user options, wrong content types,
bad timestamps and bodies that are not JSON. For every command:

  - the broker logs exactly one outcome (started, not started, refused, already
    running) and stays up, with the same pid, and no traceback or "unexpected error";
  - a UEP runs only as an account the policy allows (checked from inside each UEP by
    the probe, and in the helper's log), whatever the identity or options said.

Each command is published and its outcome awaited before the next one, so hypothesis
can shrink a failing command to its core."""

from __future__ import annotations

import datetime
import json
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from protocol.messages import MAX_ENV_VALUE
from tests.rigs import procs
from tests.rigs.mep import identity
from tests.rigs.procs import wait_for

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.usefixtures("no_strays", "rabbitmq")]
OUTCOMES = ("user endpoint started", "user endpoint not started", "start command refused",
            "user endpoint already running")
ALLOWED = ("mept-alice", "mept-bob", "mept-carol")

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12)
# keys a template or YAML might trip on: YAML syntax, Jinja syntax, dunders, newlines
hostile_keys = st.sampled_from(["worker_init", "max_workers", "engine", "a: b", "x\nengine: {type: Evil}", "{{ 7*7 }}",
                                "__class__", "_GC", "display_name", "- item", "!!python/object", ""]) | st.text(max_size=12)
usernames = st.sampled_from([f"{u}@example.org" for u in (*ALLOWED, "root", "mept-broker", "mept-sys", "mept-denied",
                                                           "mept-ingroup", "nobody", "daemon", "mept-nosuch", "..",
                                                           "../../etc/passwd", "", "mept-alice\n", "-mept-alice")]
                            + ["mept-alice@evil.org", "mept-alice", "@example.org"]) \
    | st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)  # uuid5() in the test cannot take surrogates
top_keys = st.sampled_from(["command", "args", "kwargs", "globus_effective_identity", "globus_identity_set",
                            "globus_username"])
kwarg_keys = st.sampled_from(["name", "amqp_creds", "user_opts", "user_runtime"])
changes = st.one_of(
    st.tuples(st.just("drop"), top_keys),
    st.tuples(st.just("set"), top_keys, json_values),
    st.tuples(st.just("drop-kwarg"), kwarg_keys),
    st.tuples(st.just("set-kwarg"), kwarg_keys, json_values),
    st.tuples(st.just("user_opts"), st.dictionaries(hostile_keys, json_values, max_size=4)),
    st.tuples(st.just("user_runtime"), st.dictionaries(st.sampled_from(["python", "globus_compute_sdk_version", "x"]),
                                                       json_values | st.fixed_dictionaries({"version": json_values}),
                                                       max_size=3)),
    st.tuples(st.just("more identities"), st.lists(usernames, min_size=1, max_size=3)),
    st.tuples(st.just("no identities")),
    st.tuples(st.just("name"), st.sampled_from(["a", "-x", "x/y", "..", "a" * 129, "ok.name", "A-1_b"])),
    # values at, just under and just over the helper's limits (broker/limits.py checks them where they enter)
    st.tuples(st.just("runtime at the cap"), st.sampled_from(["sdk", "python"]),
              st.sampled_from([MAX_ENV_VALUE - 1, MAX_ENV_VALUE, MAX_ENV_VALUE + 1, 5000]),
              st.sampled_from(["x", "\x00", "\ud800", "\x01", "é"])),
    st.tuples(st.just("nested"), st.sampled_from([99, 100, 101, 150, 10_000])),
    st.tuples(st.just("big option"), st.sampled_from([100_000, 500_000, 524_289, 600_000])),
)
commands = st.fixed_dictionaries({
    "user": usernames,
    "changes": st.lists(changes, max_size=2),
    "wire": st.sampled_from(["json"] * 16 + ["text/plain", "not json", "json list", "old", "epoch"]),
})


def build(mep, drawn) -> tuple[bytes, dict]:
    body = mep.command(drawn["user"])
    for change in drawn["changes"]:
        kind, *args = change
        if kind == "drop":
            body.pop(args[0], None)
        elif kind == "set":
            body[args[0]] = args[1]
        elif kind in ("drop-kwarg", "set-kwarg", "user_opts", "user_runtime", "name"):
            if not isinstance(body.get("kwargs"), dict):
                continue
            if kind == "drop-kwarg":
                body["kwargs"].pop(args[0], None)
            elif kind == "set-kwarg":
                body["kwargs"][args[0]] = args[1]
            else:
                body["kwargs"][kind] = args[0]
        elif kind == "more identities" and isinstance(body.get("globus_identity_set"), list):
            body["globus_identity_set"] += [identity(u) for u in args[0]]
        elif kind == "no identities":
            body["globus_identity_set"] = []
        elif kind == "runtime at the cap" and isinstance(body.get("kwargs"), dict):
            which, length, char = args
            value = (char * length)[:length]
            body["kwargs"]["user_runtime"] = ({"globus_compute_sdk_version": value} if which == "sdk"
                                              else {"python": {"version": value}})
        elif kind == "big option" and isinstance(body.get("kwargs"), dict):
            body["kwargs"]["user_opts"] = {"worker_init": "w" * args[0]}
    publish = {}
    wire = drawn["wire"]
    raw = json.dumps(body).encode()
    for kind, *args in drawn["changes"]:
        if kind == "nested":  # lists in user_opts that make the body nest args[0] levels deep in all
            levels = args[0] - 3  # the body, kwargs, user_opts
            raw = raw.replace(b'"user_opts": {}', b'"user_opts": {"deep": ' + b"[" * levels + b"]" * levels + b"}", 1)
    if wire == "text/plain":
        publish["content_type"] = "text/plain"
    elif wire == "not json":
        raw = raw[: len(raw) // 2]
    elif wire == "json list":
        raw = json.dumps([body]).encode()
    elif wire == "old":
        publish["timestamp"] = datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)
    elif wire == "epoch":
        publish["timestamp"] = 0
    return raw, publish


def outcome_lines(mep) -> list:
    return [line for line in mep.output().splitlines() if any(o in line for o in OUTCOMES)]


def test_random_start_commands_against_a_live_broker(live, accounts):
    a = accounts
    # UEPs outlive the test: one that exited would replay a cached start, a second outcome
    mep = live(policy={"allow_users": list(ALLOWED), "deny_users": [a.denied.pw_name],
                       "deny_groups": ["mept-denygrp"], "max_children_per_user": 40},
               environment={"PROBE_ACTION": json.dumps({"sleep": 900})})
    mep.publish(mep.command("mept-bob@example.org"))  # the bystander: another user's UEP, there throughout
    [bystander] = wait_for(lambda: list(mep.reports_now()), what="the bystander's UEP")
    broker = mep.broker_pid()
    published = []

    @settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(commands)
    def one_command(drawn):
        raw, publish = build(mep, drawn)
        before = len(outcome_lines(mep))
        published.append(raw)
        mep.publish(raw, **publish)
        wait_for(lambda: len(outcome_lines(mep)) > before or mep.proc.poll() is not None, timeout=20,
                 what=f"an outcome for {raw[:300]!r}")
        assert mep.proc.poll() is None, mep.output()[-3000:]
        assert len(outcome_lines(mep)) == before + 1, outcome_lines(mep)[before:]
        assert procs.alive(bystander), f"the bystander's UEP is gone after {raw[:300]!r}"

    one_command()
    time.sleep(1)  # a late second outcome for some command would show now
    log = mep.output()
    assert len(outcome_lines(mep)) == len(published) + 1  # and the bystander's
    assert procs.alive(bystander) and bystander in mep.reports_now()
    seen = {o: sum(o in line for line in outcome_lines(mep)) for o in OUTCOMES}
    print(seen)
    # every stage was reached: parsing refused some, mapping, templates or the helper others
    assert seen["user endpoint started"] >= 5 and seen["user endpoint not started"] >= 30, seen
    assert seen["start command refused"] >= 30, seen
    assert "Traceback" not in log and "unexpected error" not in log, log[-5000:]
    assert mep.broker_pid() == broker
    allowed_uids = {getattr(a, u.split("-")[1]).pw_uid for u in ALLOWED}
    ran_as = {r[0]["resuid"][0] for r in mep.reports_now().values()}
    assert ran_as and ran_as <= allowed_uids, ran_as
    spawned_users = {line.split(" [(")[1].split(",")[0] for line in log.splitlines()
                     if "INFO Creating new user endpoint (pid: " in line}
    assert spawned_users and spawned_users <= set(ALLOWED), spawned_users
    # and it still serves a plain start
    before = set(mep.reports_now())
    mep.publish(mep.command("mept-carol@example.org"))
    new = wait_for(lambda: set(mep.reports_now()) - before, what="a start after the fuzzing")
    assert mep.reports_now()[new.pop()][0]["resuid"][0] == a.carol.pw_uid
    assert procs.processes_of(a.broker.pw_name) == [broker]
