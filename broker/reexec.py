"""SIGHUP: the broker re-executes itself in place, keeping its pid, its helper connection
and every UEP.

The same pid matters: the helper knows the broker as its child, and each UEP was told it
as `posix_ppid`. The order (broker/main.py drives it):

  1. the new configuration is loaded and checked in the running broker; a broken one
     is refused with a log line and the running broker goes on unchanged;
  2. the AMQP consumer is cancelled; commands already in hand are finished and acked,
     commands delivered but not begun are left unacked, so closing the channel
     requeues them for the new image (none is lost, none is served twice);
  3. once no helper request is in flight, the state below goes into a memfd, the fds it
     names lose FD_CLOEXEC, and the broker execs its own command line, with the stop and
     reload signals blocked: one that arrives before the new image has its handlers
     waits for them instead of killing it.

The state holds secrets (each UEP's Fernet key, the registration's AMQP credentials), so it travels in a memfd that only this
process holds, never in the environment or a file.
"""

from __future__ import annotations

import json
import os
import signal
import sys

RESUME_ENV = "MEP_RESUME_FD"
HELPER_ENV = "MEP_HELPER_FD"
VERSION = 1
HELD_SIGNALS = {signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT}  # handled by Broker._signals


def save(mep) -> tuple[int, list[int]]:
    """Write the state to a memfd; returns it and the fds that must survive exec.

    Must run with no await between it and exec: the helper session must not read on."""
    helper, audit, records = mep.helper, mep.audit, []
    for uep in mep.uep:
        record = uep.export()
        if record["audit_pipe"] is not None and (audit is None or not audit.watching(record["audit_pipe"])):
            record["audit_pipe"] = None  # already at EOF and closed
        records.append(record)
    state = {"version": VERSION, "helper_fd": helper.sock.fileno(), "session": helper.session.export(),
             "started": mep.started, "next_req": helper.next_req, "ueps": records,
             "registration": mep.registration}  # a reload needs no Auth call: the new image serves on with it
    keep = [state["helper_fd"]] + [fd for r in records for fd in (r["cred_fd"], r["audit_pipe"]) if fd is not None]
    fd = os.memfd_create("mep-broker-state", os.MFD_CLOEXEC)
    os.write(fd, json.dumps(state).encode())
    os.lseek(fd, 0, os.SEEK_SET)
    return fd, keep


def exec_self(state_fd: int, keep: list[int]) -> None:
    """Replace this process image with a fresh broker. Returns only if exec failed, with
    every fd back to close-on-exec."""
    for fd in [state_fd, *keep]:
        os.set_inheritable(fd, True)
    os.environ[RESUME_ENV], os.environ[HELPER_ENV] = str(state_fd), str(keep[0])
    # the new image has default dispositions until it installs its handlers, and a SIGHUP
    # then would kill it: these stay blocked (and pending) across exec until it has
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
    try:
        os.execv(sys.executable, sys.orig_argv)
    finally:  # reached only when exec failed
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        del os.environ[RESUME_ENV], os.environ[HELPER_ENV]
        for fd in keep:
            os.set_inheritable(fd, False)
        os.close(state_fd)


def load() -> dict | None:
    """The state a previous image left, or None on a first start. Every fd it names is
    made close-on-exec again."""
    fd = os.environ.pop(RESUME_ENV, None)
    if fd is None:
        return None
    with os.fdopen(int(fd), "rb") as f:
        state = json.load(f)
    if state.get("version") != VERSION:
        raise ValueError(f"resume state version {state.get('version')!r}, expected {VERSION}")
    os.environ.pop(HELPER_ENV, None)
    for r in state["ueps"]:
        for fd in (r["cred_fd"], r["audit_pipe"]):
            if fd is not None:
                os.set_inheritable(fd, False)
    os.set_inheritable(state["helper_fd"], False)
    return state
