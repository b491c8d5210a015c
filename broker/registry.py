"""The broker's record of its running user endpoints, and what it hands each one.

A UEP is known by its name (the UEP id the service chose). A start for a running name
refreshes that UEP's AMQP credentials through its credential memfd and is remembered:
if the UEP then exits (it may have been shutting down when the start arrived), the
start is replayed, as upstream does.
"""

from __future__ import annotations

import json
import os
import time

import attrs
from cryptography.fernet import Fernet

from protocol.messages import CHANNEL_FDS  # where the helper puts the UEP's ends (privhelper/child.py)

CRED_FD, AUDIT_FD = CHANNEL_FDS["cred"], CHANNEL_FDS["audit"]


@attrs.define
class UEP:
    name: str
    username: str
    uid: int
    pid: int
    endpoint_id: str
    identity: str
    enckey: bytes
    cred_fd: int | None
    audit_pipe: int | None = None  # owned by the AuditLog, which closes it at EOF
    started: float = attrs.field(factory=time.time)
    replay: object = None  # the last StartCommand that arrived while this UEP ran
    amqp_creds: dict | None = None  # the latest, for a notice when the MEP stops it
    batch: str | None = None  # its batch provider, whose jobs are cancelled when it ends (broker/batch_cleanup.py)

    def uptime(self) -> float:
        return time.time() - self.started

    def write_credentials(self, amqp_creds: dict) -> None:
        """Upstream's refresh: Fernet({"amqp_creds": ...}) replaces the memfd's content."""
        self.amqp_creds = amqp_creds
        token = Fernet(self.enckey).encrypt(json.dumps({"amqp_creds": amqp_creds}, separators=(",", ":")).encode())
        os.ftruncate(self.cred_fd, 0)
        os.lseek(self.cred_fd, 0, os.SEEK_SET)
        os.write(self.cred_fd, token)

    def close_cred(self) -> None:
        if self.cred_fd is not None:
            os.close(self.cred_fd)
            self.cred_fd = None

    def export(self) -> dict:
        """For a re-exec'd broker (broker/reexec.py): plain JSON; the fds stay open across exec."""
        state = attrs.asdict(self, recurse=False)
        state["enckey"] = self.enckey.decode()
        state["replay"] = None if self.replay is None else attrs.asdict(self.replay)
        return state

    @classmethod
    def resume(cls, state: dict, command_type) -> "UEP":
        state = dict(state, enckey=state["enckey"].encode())
        if state["replay"] is not None:
            state["replay"] = command_type(**state["replay"])
        return cls(**state)


class Registry:
    def __init__(self):
        self.by_name: dict[str, UEP] = {}
        self.by_pid: dict[int, UEP] = {}

    def add(self, uep: UEP) -> None:
        self.by_name[uep.name] = self.by_pid[uep.pid] = uep

    def remove(self, pid: int) -> UEP | None:
        uep = self.by_pid.pop(pid, None)
        if uep is not None and self.by_name.get(uep.name) is uep:
            del self.by_name[uep.name]
        return uep

    def __len__(self) -> int:
        return len(self.by_pid)

    def __iter__(self):
        return iter(list(self.by_pid.values()))


def stdin_document(*, amqp_creds: dict, config_text: str, posix_ppid: int, candidates, matched_identity: str,
                   enckey: bytes, allowed_functions, audit: bool) -> bytes:
    """What globus-compute-endpoint 4.19's `_start-user-endpoint` reads from stdin."""
    doc = {"amqp_creds": amqp_creds, "config": config_text,
           "ep_info": {"posix_ppid": posix_ppid, "globus_candidate_identities": candidates,
                       "globus_matched_identity": matched_identity},
           "mem_fd": CRED_FD, "enckey": enckey.decode()}
    if allowed_functions is not None:
        doc["allowed_functions"] = list(allowed_functions)
    if audit:
        doc["audit_fd"] = AUDIT_FD
    return json.dumps(doc, separators=(",", ":")).encode()
