"""Who may be spawned (SECURITY-REVIEW 5-8), against real passwd and group entries."""

import pytest

from protocol.messages import Spawn

from tests.rigs import procs
from tests.rigs.accounts import PREFIX, add_user

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("no_strays")]


def refused(client, user, uid=None, **kw):
    reply = client.spawn(user, uid=uid, **kw)
    assert reply.type == "refused", reply
    return reply


def test_uid_zero_is_never_spawned(helpers):
    """5: root, by name and uid, whatever min_uid says."""
    helper, client = helpers(min_uid=1)
    reply = refused(client, "root", 0)
    assert reply.code == "uid-zero"
    assert reply.reason == "uid 0 is never spawned (policy min_uid=1)"
    assert "code=uid-zero" in helper.output()  # the admin's log says it too


def test_policy_cannot_allow_uid_zero(rigdir, sh):
    """5: min_uid = 0 in a policy stops the helper at start."""
    policy = rigdir.policy(min_uid=0)
    out = sh(*rigdir.helper_cmd(policy, "--fd", "0"))
    assert out.returncode == 78
    assert "min_uid must be at least 1 (uid 0 is never spawned)" in out.stderr


def test_system_account_below_min_uid(helpers, accounts):
    helper, client = helpers()
    reply = refused(client, accounts.system)
    assert reply.code == "uid-below-min"
    assert f"uid {accounts.system.pw_uid}" in reply.reason and "min_uid=1000" in reply.reason


def test_nobody_is_refused_even_with_a_low_min_uid(helpers, accounts):
    helper, client = helpers(min_uid=1)
    reply = refused(client, accounts.nobody)
    assert reply.code == "uid-reserved"


def test_denied_user_and_denied_group(helpers, accounts):
    helper, client = helpers(deny_users=[accounts.denied.pw_name], deny_groups=["mept-denygrp"])
    assert refused(client, accounts.denied).code == "denied-user"
    reply = refused(client, accounts.ingroup)
    assert reply.code == "denied-group" and "mept-denygrp" in reply.reason
    assert client.spawn(accounts.alice).type == "spawned"  # the others still work


def test_allow_lists(helpers, accounts):
    helper, client = helpers(allow_groups=["mept-science"], allow_users=[accounts.carol.pw_name])
    assert refused(client, accounts.alice).code == "not-allowed"
    assert client.spawn(accounts.bob).type == "spawned"  # via mept-science
    assert client.spawn(accounts.carol).type == "spawned"  # by name


def test_expected_uid_must_match(helpers, accounts):
    """6: the broker's idea of the uid must be the system's."""
    helper, client = helpers()
    reply = refused(client, accounts.alice.pw_name, accounts.bob.pw_uid)
    assert reply.code == "uid-mismatch"
    assert str(accounts.alice.pw_uid) in reply.reason and str(accounts.bob.pw_uid) in reply.reason


def test_name_must_round_trip(helpers, accounts):
    """6: a second passwd name for alice's uid does not round-trip through getpwuid."""
    helper, client = helpers()
    reply = refused(client, accounts.alias)
    assert reply.code == "no-round-trip"
    assert "mept-alice" in reply.reason


def test_unknown_user(helpers):
    helper, client = helpers()
    reply = refused(client, "mept-nosuchuser", 4242)
    assert reply.code == "unknown-user"


@pytest.mark.parametrize("username", ["../root", "a/b", "-x", "x\ny", "a\x00", "x" * 33, "a..b", ""])
def test_bad_usernames_end_the_connection(helpers, accounts, username):
    """7: the decoder refuses them; a broker that sends one is broken or hostile."""
    helper, client = helpers()
    client.send_unchecked({"type": "spawn", "req": "x1", "username": username, "uid": 1000,
                           "name": "uep", "env": {}, "stdin": "", "channels": []})
    assert helper.wait() == 2
    assert "spawn.username" in helper.output()


def test_limits_hold_under_a_burst(helpers, accounts):
    """8: 30 requests written back to back, before a single reply is read: the per-user
    and total limits both hold, and exactly the allowed UEPs run."""
    helper, client = helpers(max_children=4, max_children_per_user=2)
    a, b, c = accounts.alice, accounts.bob, accounts.carol
    order = [a, a, a, b, c] * 6  # alice hits her limit first, then the total is reached
    reqs = []
    for i, user in enumerate(order):
        req = client.req_id()
        client.request(Spawn(req, user.pw_name, user.pw_uid, f"u{i}", {}, b'{"sleep": 5}', ()))
        reqs.append((req, user.pw_name))
    replies = [(name, client.reply(req)) for req, name in reqs]
    spawned = [(name, r) for name, r in replies if r.type == "spawned"]
    assert [name for name, _ in spawned] == [a.pw_name, a.pw_name, b.pw_name, c.pw_name]
    assert replies[2][1].code == "limit-user" and "max_children_per_user" in replies[2][1].reason
    assert {r.code for _, r in replies[5:]} == {"limit-total"}
    assert sorted(p for u in (a, b, c) for p in procs.processes_of(u.pw_name)) == sorted(r.pid for _, r in spawned)
    helper.stop()
    assert procs.wait_gone([r.pid for _, r in spawned]) == []


def test_reserved_and_top_uids_with_real_accounts(accounts):
    """5: (uid_t)-2 is refused even when max_uid allows it; the default max_uid is 2^31 - 1
    exactly. (uid_t)-1 cannot be created with useradd, and CPython reports such an entry's
    uid as -1, which no request can carry: docs/mutation.md.)"""
    from privhelper.authorize import Refusal, authorize
    from privhelper.policy import Policy
    made = {uid: add_user(f"{PREFIX}uid{uid}", uid=uid, system=True) for uid in (2**32 - 2, 2**31 - 1, 2**31)}
    try:
        def check(pw, **kw):
            pol = Policy(path="/p", broker_user="b", broker_uid=999, key_file="/k", uep_argv=("/bin/true", "{name}"), **kw)
            try:
                return authorize(Spawn("r", pw.pw_name, pw.pw_uid, "u", {}, b"", ()), pol, 0, lambda uid: 0).uid
            except Refusal as r:
                return r.code
        assert check(made[2**32 - 2], max_uid=2**32 - 1) == "uid-reserved"
        assert check(made[2**32 - 2], max_uid=2**32 - 2) == "uid-reserved"
        assert check(made[2**31 - 1]) == 2**31 - 1  # the default max_uid, exactly
        assert check(made[2**31]) == "uid-reserved"
        assert check(made[2**31], max_uid=2**31) == 2**31
    finally:
        for pw in made.values():
            procs.run("userdel", pw.pw_name, check=False)
