"""One broker per endpoint directory: NAME/run/mep.lock, held with flock(2) for the
broker's whole life (across its re-execs: the fd is inherited, and the lock with it).

A second `mepctl start NAME` would otherwise replace the first one's admin socket and
consume the same command queue. The kernel releases the lock when its holder dies, so a
MEP killed with SIGKILL leaves nothing that blocks the next start. The file holds the
holder's pid, for the refusal's message.
"""

from __future__ import annotations

import fcntl
import os
import pathlib

from broker import layout

FILE = layout.LOCK_FILE
RESUME_ENV = "MEP_LOCK_FD"  # the fd a re-exec'd image goes on holding


class AlreadyRunning(Exception):
    pass


def acquire(conf_dir: pathlib.Path, name: str) -> int:
    """The locked fd, or AlreadyRunning naming the pid that holds the lock."""
    if (inherited := os.environ.pop(RESUME_ENV, None)) is not None:
        os.set_inheritable(int(inherited), False)
        return int(inherited)
    path = layout.lock_file(conf_dir)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise AlreadyRunning(f"endpoint {name} is already running (broker pid {holder}, lock {path}); stop it first "
                             f"with `mepctl stop {name}`") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def pass_on(fd: int) -> list[int]:
    """Before a re-exec: the fds the new image keeps (and where it finds them)."""
    os.environ[RESUME_ENV] = str(fd)
    return [fd]
