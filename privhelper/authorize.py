"""Who may be spawned, checked before any fork. Each refusal names its rule, so the admin's
log and the user's failure notice say the same thing."""

import grp
import os
import pwd
import typing

from privhelper.policy import FIXED_ENV, NOBODY_UIDS


class Refusal(Exception):
    def __init__(self, code: str, reason: str):
        super().__init__(f"{code}: {reason}")
        self.code, self.reason = code, reason


class Account(typing.NamedTuple):
    name: str
    uid: int
    gid: int
    home: str
    shell: str
    groups: tuple  # every gid the user is in, primary included, as initgroups sets them

    @classmethod
    def of(cls, pw):
        return cls(pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir, pw.pw_shell,
                   tuple(sorted(set(os.getgrouplist(pw.pw_name, pw.pw_gid)))))


def authorize(req, policy, total_children: int, children_of) -> Account:
    """Return the account to run `req` as, or raise Refusal. `children_of(uid)` counts
    the live children of one user."""
    if total_children >= policy.max_children:
        raise Refusal("limit-total", f"{total_children} UEPs running, the limit is {policy.max_children} (policy max_children)")
    try:
        pw = pwd.getpwnam(req.username)
    except KeyError:
        raise Refusal("unknown-user", f"no local account named {req.username!r}") from None
    if pw.pw_uid != req.uid:
        raise Refusal("uid-mismatch", f"{req.username!r} has uid {pw.pw_uid}, the request expected {req.uid}")
    uid = pw.pw_uid
    if uid == 0:
        raise Refusal("uid-zero", f"uid 0 is never spawned (policy min_uid={policy.min_uid})")
    if uid < policy.min_uid:
        raise Refusal("uid-below-min", f"uid {uid} of {req.username!r} is a system account (policy min_uid={policy.min_uid})")
    if uid in NOBODY_UIDS or uid > policy.max_uid:
        raise Refusal("uid-reserved", f"uid {uid} of {req.username!r} is reserved (nobody/overflow, or above policy max_uid={policy.max_uid})")
    if (back := _lookup(pwd.getpwuid, uid)) != req.username:
        raise Refusal("no-round-trip", f"uid {uid} maps back to {back!r}, not {req.username!r}")
    if req.username in policy.deny_users:
        raise Refusal("denied-user", f"{req.username!r} is listed in policy deny_users")
    account = Account.of(pw)
    names = {_lookup(grp.getgrgid, gid) for gid in account.groups}
    if denied := sorted(names & policy.deny_groups):
        raise Refusal("denied-group", f"{req.username!r} is in group {denied[0]!r}, listed in policy deny_groups")
    if policy.allow_users or policy.allow_groups:
        if req.username not in policy.allow_users and not names & policy.allow_groups:
            raise Refusal("not-allowed", f"{req.username!r} is in neither policy allow_users nor allow_groups")
    for name in req.env:
        if policy.env_denied(name) or name in FIXED_ENV:
            raise Refusal("env-denied", f"environment variable {name!r} may not be set for a UEP (helper env deny-list; "
                          "the administrator may allow it by name with env_allow in the helper policy)")
    if (running := children_of(uid)) >= policy.max_children_per_user:
        raise Refusal("limit-user", f"{req.username!r} has {running} UEPs running, the limit is {policy.max_children_per_user} (policy max_children_per_user)")
    return account


def _lookup(getter, id_: int) -> str | None:
    """The name of a uid or gid, or None if the database has no entry."""
    try:
        return getter(id_)[0]  # pw_name / gr_name
    except KeyError:
        return None
