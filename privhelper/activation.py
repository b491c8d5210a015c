"""Socket activation (systemd Accept=yes): take the one connection systemd hands over,
and refuse a peer that is not the broker before reading a byte from it."""

import os
import socket
import stat
import struct

SD_LISTEN_FDS_START = 3


class ActivationError(Exception):
    pass


def inherited_connection(broker_uid: int) -> socket.socket:
    listen_pid, listen_fds = os.environ.get("LISTEN_PID"), os.environ.get("LISTEN_FDS")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    if listen_pid != str(os.getpid()):
        raise ActivationError(f"LISTEN_PID={listen_pid!r} does not name this process ({os.getpid()}); not socket-activated for us")
    if listen_fds != "1":
        raise ActivationError(f"LISTEN_FDS={listen_fds!r}: expected exactly 1 (the unit needs Accept=yes)")
    sock = unix_stream(SD_LISTEN_FDS_START)
    pid, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    if uid != broker_uid:
        sock.close()
        raise ActivationError(f"peer pid {pid} has uid {uid}, not the broker uid {broker_uid}; refused before reading")
    return sock


def unix_stream(fd: int) -> socket.socket:
    """The connected unix stream socket at `fd`, or ActivationError saying what it is."""
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise ActivationError(f"fd {fd} is not a socket")
    except OSError as e:
        raise ActivationError(f"fd {fd}: {e.strerror}") from None
    sock = socket.socket(fileno=fd)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise ActivationError(f"fd {fd} is {sock.family.name}/{sock.type.name}, expected a unix stream socket")
    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        raise ActivationError(f"fd {fd} is a listening socket; the unit needs Accept=yes")
    return sock
