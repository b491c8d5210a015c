"""Hostile input against the live helper (issue 7; SECURITY-REVIEW 2-4 on the real loop).

Every case is a fresh helper serving one connection, forked by tests/rigs/forkserver.py
from the real helper code as root (real kernel, real accounts, real policy file): one
case in 20 runs the helper's whole entry point, the others its monitor loop alone with
the policy loaded once (the frames meet the same code either way; forking the loop
alone takes ~3 ms a case instead of ~11). The oracle, for every case:

  - the helper ends by its own rules: exit 0 (the peer closed at a frame boundary) or 2
    (a fatal protocol error); never 3 (an unexpected exception), never a signal, never a
    traceback in its log;
  - a `spawned` reply only ever answers an intact, signed spawn of an account the policy
    allows (ALLOWED below, written out here rather than read from the helper's code);
  - once all cases ran, no process of a test account is left.

The frame corpus is drawn from a seeded generator (MEP_FUZZ_SEED to replay one run; the
seed is printed), the signed spawn requests by hypothesis."""

from __future__ import annotations

import collections
import json
import os
import random
import re
import secrets
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from broker.protocol_session import BrokerSession
from protocol import canonical
from protocol.framing import encode_frame
from protocol.errors import ProtocolError
from protocol.messages import MAX_ENV_VALUE, MAX_ENV_VARS, MAX_PID, MAX_STDIN, Ping, Signal, Spawn, from_wire, to_wire
from protocol.session import request_mac
from tests.rigs import procs
from tests.rigs.helper import ForkServer

pytestmark = [pytest.mark.root, pytest.mark.slow]
FRAMES = int(os.environ.get("MEP_FUZZ_FRAMES", "10000"))  # fewer only to debug
SESSION_LINE = re.compile(r"session process \d+ for req=(\S+) user=(\S+) uid=(\d+)")
DENIED_ENV = ["LD_PRELOAD", "PYTHONPATH", "BASH_FUNC_x", "GLIBC_TUNABLES", "HOME", "USER", "IFS", "PERL5OPT"]


class Outcome:
    def __init__(self, status: int, replies: list, log: str):
        self.status, self.replies, self.log = status, replies, log
        self.code = os.waitstatus_to_exitcode(status)

    def problems(self, allowed: dict, sent: dict) -> list:
        found = []
        if self.code not in (0, 2):
            found.append(f"helper ended with {self.code} (0 and 2 are its only rules)")
        if "Traceback" in self.log or "unexpected error" in self.log:
            found.append("a traceback in the helper's log")
        for req, user, uid in SESSION_LINE.findall(self.log):  # what the helper forked, answered or not
            if allowed.get(user) != int(uid) or req not in sent or sent[req].username != user:
                found.append(f"a session process for req={req} user={user} uid={uid}")
        for reply in self.replies:
            if reply.get("type") == "spawned":
                req = sent.get(reply.get("req"))
                if req is None or allowed.get(req.username) != req.uid or set(req.env) & set(DENIED_ENV):
                    found.append(f"spawned {reply} for {req}")
        return found


@pytest.fixture(scope="module")
def fuzz(rigdir, accounts):
    a = accounts
    policy = rigdir.policy(allow_users=[u.pw_name for u in (a.alice, a.bob, a.carol, a.denied, a.ingroup, a.system,
                                                            a.alias, a.broker)],
                           deny_users=[a.denied.pw_name], deny_groups=["mept-denygrp"], max_children_per_user=2,
                           io_timeout_seconds=5)
    server = ForkServer(rigdir, policy)
    allowed = {u.pw_name: u.pw_uid for u in (a.alice, a.bob, a.carol)}
    yield server, allowed
    server.close()
    left = {u.pw_name: procs.processes_of(u.pw_name) for u in (a.alice, a.bob, a.carol)}
    for pids in left.values():
        procs.kill_all(pids)
    assert not any(left.values()), f"processes left running as test users: {left}"


# -- the frame corpus --------------------------------------------------------------------

def candidate_accounts(accounts) -> list:
    a = accounts
    named = [(u.pw_name, u.pw_uid) for u in (a.alice, a.bob, a.carol, a.denied, a.ingroup, a.system, a.alias,
                                              a.broker, a.badshell, a.nobody)]
    return named + [("root", 0), ("daemon", 1), (a.alice.pw_name, 0), (a.alice.pw_name, a.bob.pw_uid),
                    ("mept-nosuchuser", 4242), (a.bob.pw_name, a.bob.pw_uid + 1)]


def random_request(rng: random.Random, who: list, seq_req: str):
    kind = rng.random()
    if kind < 0.01:  # every field at, or one under, its limit: valid, so never fatal
        username, uid = rng.choice(who)
        env = {f"V{i:02d}{'_' * 59}"[:64]: "v" * rng.choice([MAX_ENV_VALUE - 1, MAX_ENV_VALUE])
               for i in range(rng.choice([MAX_ENV_VARS - 1, MAX_ENV_VARS]))}
        return Spawn(seq_req, username, uid, "n" * rng.choice([127, 128]), env,
                     rng.randbytes(rng.choice([MAX_STDIN - 1, MAX_STDIN])), ())
    if kind < 0.6:
        username, uid = rng.choice(who)
        env = {rng.choice(DENIED_ENV + ["FOO", "GC_X", "LANG"]): "x" for _ in range(rng.randrange(3))}
        return Spawn(seq_req, username, uid, secrets.token_hex(6), env, rng.randbytes(rng.randrange(40)),
                     rng.choice([(), ("cred",), ("audit",), ("cred", "audit")]))
    if kind < 0.85:
        return Signal(seq_req, rng.choice([rng.randrange(1, MAX_PID + 1), 1, MAX_PID]),
                      rng.choice(["TERM", "INT", "KILL", "HUP"]))
    return Ping(seq_req)


def mutate(rng: random.Random, frame: bytes) -> bytes:
    out = bytearray(frame)
    for _ in range(rng.choice([1, 1, 1, 2, 3, 8])):
        pos = rng.randrange(len(out) + 1)
        op = rng.random()
        if op < 0.4 and pos < len(out):
            out[pos] ^= rng.randrange(1, 256)
        elif op < 0.6:
            out[pos:pos] = rng.randbytes(rng.randrange(1, 5))
        elif op < 0.8:
            del out[pos:pos + rng.randrange(1, 5)]
        elif op < 0.9:  # a plausible token where a value was
            out[pos:pos] = rng.choice([b'"', b"{", b"}", b"[", b",", b":", b"null", b"true", b"-1", b"\\u0000",
                                       b"1e999", b"\xff", b"\x00"])
        else:  # a new length header
            out[0:4] = struct.pack(">I", rng.choice([0, 1, len(out), len(out) - 5, 1 << 20, (1 << 20) + 1, 1 << 31,
                                                     rng.randrange(1 << 32)]))
    return bytes(out)


def random_json(rng: random.Random, depth=0):
    choice = rng.random()
    if depth > 2 or choice < 0.5:
        return rng.choice([None, True, False, 0, -1, 1 << 40, -(1 << 63), "", "x" * rng.randrange(300), "..",
                           "/etc/passwd", "-rf", "a\u0000b", "\u202e", rng.randrange(1 << 22), "TERM", "spawn"])
    if choice < 0.75:
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(["type", "req", "seq", "mac", "uid", "env", "x", ""]): random_json(rng, depth + 1)
            for _ in range(rng.randrange(4))}


def signed_junk(rng: random.Random, session: BrokerSession, req, sent: dict) -> bytes:
    """A request whose MAC is right but whose content is not: the schema must hold alone.
    Now and then the changes leave a valid request (another req id, say): it goes into
    `sent` as what it now is, so that the oracle judges what the helper was really asked."""
    obj = {**to_wire(req), "seq": session.next_seq}
    for _ in range(rng.randrange(1, 4)):
        op = rng.random()
        key = rng.choice(sorted(obj))
        if op < 0.3:
            obj.pop(key)
        elif op < 0.6:
            obj[key] = random_json(rng)
        elif op < 0.7:
            obj[rng.choice(["extra", "pid", "username", "mac2", "Type"])] = random_json(rng)
        elif op < 0.8:
            obj["type"] = rng.choice(["hello", "spawned", "challenge", "exited", "pong", "SPAWN", "ping", "signal"])
        elif op < 0.9:
            obj["seq"] = rng.choice([0, session.next_seq + 1, session.next_seq - 1, True, "1", -1])
        else:
            obj[key] = rng.choice([True, 1, "1", [], {}])
    obj.pop("mac", None)
    try:
        valid = from_wire({k: v for k, v in obj.items() if k != "seq"})
        sent[valid.req] = valid
    except ProtocolError:
        pass
    body = canonical.dumps(obj)
    obj["mac"] = request_mac(session._key, session.nonce, body)
    return encode_frame(canonical.dumps(obj))


def make_case(rng: random.Random, who: list, allowed: dict, sent: dict):
    """A script for ForkServer.case: the kind of hostile input, chosen at random."""
    kind = rng.random()

    def script(session: BrokerSession):
        if kind < 0.15:  # random bytes where a hello should be
            return [rng.randbytes(rng.randrange(0, 200))]
        if kind < 0.25:  # a framed but random body
            return [encode_frame(json.dumps(random_json(rng)).encode() or b"0")]
        hello = session.hello()
        if kind < 0.40:
            return [mutate(rng, hello)]
        chunks = [hello]
        for _ in range(rng.randrange(4)):  # intact requests first: the connection is well into its life
            req = random_request(rng, who, f"r{session.next_seq}")
            if isinstance(req, Spawn) and allowed.get(req.username) == req.uid and not set(req.env) & set(DENIED_ENV) \
                    and rng.random() > 0.03:
                req = Ping(req.req)  # a UEP now and then, not in every case: they take a while to start
            sent[req.req] = req
            chunks.append(session.send(req))
        last = random_request(rng, who, f"r{session.next_seq}")
        sent[last.req] = last
        if kind < 0.75:
            chunks.append(mutate(rng, session.send(last)))
        elif kind < 0.9:
            chunks.append(signed_junk(rng, session, last, sent))
        else:  # intact but cut anywhere, in pieces
            data = b"".join([*chunks[1:], session.send(last)])
            cut = rng.randrange(len(data) + 1)
            chunks = [hello] + [data[i:i + 7] for i in range(0, cut, 7)]
        return chunks
    return script


def bystander_case(rng: random.Random, who: list, accounts, sent: dict):
    """Valid requests only, many at the caps, after a bystander UEP (alice, sleeping): the
    helper answers each, and the bystander must still run when the connection ends."""
    count = rng.randrange(1, 6)

    def script(session: BrokerSession):
        bystander = Spawn(f"r{session.next_seq}", accounts.alice.pw_name, accounts.alice.pw_uid, "bystander", {},
                          json.dumps({"sleep": 30}).encode(), ())
        sent[bystander.req] = bystander
        chunks = [session.hello(), session.send(bystander)]
        for _ in range(count):
            req = random_request(rng, who, f"r{session.next_seq}")
            sent[req.req] = req
            chunks.append(session.send(req))
        return chunks
    return script, count + 1


def test_ten_thousand_random_and_mutated_frames(fuzz, accounts):
    server, allowed = fuzz
    seed = int(os.environ.get("MEP_FUZZ_SEED") or secrets.randbits(32))
    print(f"MEP_FUZZ_SEED={seed}")
    rng, who = random.Random(seed), candidate_accounts(accounts)
    codes, refusals, forked, problems = collections.Counter(), collections.Counter(), 0, []
    t0 = time.monotonic()
    bystanders = 0
    for i in range(FRAMES):
        sent = {}
        if i % 50 == 25:  # the bystander's oracle: valid requests, at the caps too, never end its UEP
            script, answers = bystander_case(rng, who, accounts, sent)
            outcome = Outcome(*server.case(script, answers=answers))
            [spawned] = [r for r in outcome.replies if r.get("req") == "r1"]
            answered = {r.get("req") for r in outcome.replies if r.get("type") in ("spawned", "refused", "signaled", "pong")}
            if outcome.code != 0 or spawned["type"] != "spawned" or answered != set(sent) or any(
                    r.get("type") == "exited" and r.get("pid") == spawned.get("pid") for r in outcome.replies):
                problems.append((i, ["the bystander case", outcome.code, spawned, sorted(set(sent) - answered)],
                                 outcome.log[-2000:]))
            bystanders += 1
            codes[outcome.code] += 1
            continue
        outcome = Outcome(*server.case(make_case(rng, who, allowed, sent), whole_helper=i % 20 == 0))
        codes[outcome.code] += 1
        refusals.update(r["code"] for r in outcome.replies if r.get("type") == "refused")
        forked += len(SESSION_LINE.findall(outcome.log))
        if found := outcome.problems(allowed, sent):
            problems.append((i, found, outcome.log[-2000:]))
            if len(problems) >= 5:
                break
    print(f"{FRAMES} cases in {time.monotonic() - t0:.1f}s: exit codes {dict(codes)}, refusals {dict(refusals)}, "
          f"{forked} session processes forked")
    assert not problems, f"seed {seed}: {problems}"
    assert server.proc.poll() is None
    # the corpus reached every layer: framing and MAC (exit 2), the end of a connection at a
    # frame boundary (0), the policy's refusals, and spawns (whose UEPs the hostile frame
    # after them stops again, so their `spawned` seldom comes)
    assert codes[2] > FRAMES // 2 and codes[0] > 0
    assert {"unknown-user", "uid-mismatch", "uid-zero", "uid-below-min", "denied-user", "denied-group",
            "no-round-trip", "env-denied", "not-our-child", "uid-reserved"} <= set(refusals), refusals
    assert forked > 0 and bystanders == FRAMES // 50


# -- signed, well-formed spawn requests (hypothesis) ---------------------------------------

@pytest.fixture(scope="module")
def who(accounts):
    return candidate_accounts(accounts)


env_names = st.sampled_from(DENIED_ENV + ["FOO", "LANG", "GC_DEBUG"]) | st.from_regex(r"[A-Z_][A-Z0-9_]{0,12}",
                                                                                         fullmatch=True)
spawn_fields = st.tuples(st.integers(0, 15), st.booleans(), st.integers(-3, 3) | st.sampled_from([0, 65534, 1 << 31]),
                         st.dictionaries(env_names, st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=20),
                                         max_size=3))


def test_signed_spawn_requests_spawn_only_what_the_policy_allows(fuzz, who):
    """Authentic, schema-valid spawns of any account and uid, several to a connection
    (hypothesis draws them): each is answered exactly once, and `spawned` only for
    ALLOWED with its own uid and no denied variable."""
    server, allowed = fuzz
    seen = collections.Counter()

    @settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(spawn_fields, min_size=1, max_size=6))
    def one_connection(fields):
        sent = {}

        def script(session):
            chunks = [session.hello()]
            for pick, exact, delta, env in fields:
                username, uid = who[pick]
                uid = uid if exact else (uid + delta if abs(delta) <= 3 else delta)
                req = Spawn(f"r{session.next_seq}", username, max(0, min(uid, (1 << 32) - 1)), secrets.token_hex(6),
                            env, b"", ("audit",))
                sent[req.req] = req
                chunks.append(session.send(req))
            return chunks
        outcome = Outcome(*server.case(script, answers=len(fields)))
        assert outcome.code == 0, outcome.log
        assert not outcome.problems(allowed, sent), outcome.problems(allowed, sent)
        answered = collections.Counter(r["req"] for r in outcome.replies if r["type"] in ("spawned", "refused"))
        assert answered == collections.Counter(list(sent)), (answered, outcome.log)
        seen.update(r["type"] for r in outcome.replies)

    one_connection()
    assert seen["spawned"] >= 10 and seen["refused"] >= 100, seen  # both sides of the rule were exercised
