"""Stage 2 of a start (broker/pipeline.py): the identity set -> a local account.

`account_for` runs the live identity mapping (broker/idmap.py) off the event loop (an
external mapper is a program), then checks the name against the helper's rules and the
passwd database. The admin's dry runs (`mepctl check-idmap`, `render-user-config`) call
the same function, so what they show is what a start would do.
"""

from __future__ import annotations

import asyncio
import os
import pwd

import attrs

from broker import limits, notices
from broker.idmap import IdentityMapper, Mapped
from broker.refusal import Refused


@attrs.frozen
class Account:
    """A mapped local account: its passwd entry and the mapping that chose it."""
    passwd: pwd.struct_passwd
    mapped: Mapped

    @property
    def username(self) -> str:
        return self.passwd.pw_name

    @property
    def uid(self) -> int:
        return self.passwd.pw_uid


async def account_for(idmap: IdentityMapper, identity_set: list) -> Account:
    """The account a start for `identity_set` runs as, or Refused."""
    try:  # an external mapper runs a program: keep it off the event loop
        mapped = await asyncio.to_thread(idmap.map, identity_set)
    except Exception as e:  # noqa: BLE001 - a mapper's own failure
        raise Refused("Unhandled error attempting to map to a local user name.",
                      f"identity mapper failed: ({type(e).__name__}) {e}") from None
    if mapped is None:
        raise Refused("Identity failed to map to a local user name.",
                      f"no rule of {idmap.path} maps any identity of the set",
                      identities=[i.get("username") for i in identity_set])
    try:
        limits.username(mapped.username)
    except limits.LimitBroken as e:
        raise Refused(notices.start_failed(mapped.username, f"{e}; see your system administrator"),
                      f"{mapped.rule} mapped to {mapped.username!r}, a name the helper does not start: {e}") from None
    try:
        passwd = pwd.getpwnam(mapped.username)
    except KeyError:
        raise Refused(f"Identity mapped to a local user name, but local user does not exist. "
                      f"Local user name: {mapped.username}",
                      f"{mapped.rule} mapped to {mapped.username!r}, which has no passwd entry") from None
    if passwd.pw_uid == os.getuid():
        raise Refused(notices.start_failed(passwd.pw_name, "the mapped user is the endpoint's own account; "
                                           "see your system administrator"),
                      f"{mapped.rule} maps to the broker's own account {passwd.pw_name}")
    return Account(passwd, mapped)
