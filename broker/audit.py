"""The audit log of a high-assurance MEP: one line per UEP task event, read from each
UEP's audit pipe (a packet pipe: one record per read), in upstream's format:

    2026-11-25T10:00:00+00:00 uid=1001 pid=4242 uep=<UEP id> <record>

between `Begin MEP session =====` and `End MEP session -----` sentinel lines. The file is
created 0600 if absent and only ever appended to. If a write fails (disk full, read-only
file system) the log is marked broken: the MEP then refuses new high-assurance starts
with a notice rather than run tasks it cannot account for (docs/decisions.md).
"""

from __future__ import annotations

import asyncio
import datetime
import os
import resource

RECORD_MAX = resource.getpagesize()


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat()


class AuditLog:
    def __init__(self, path, endpoint_id: str, log, resumed: bool = False):
        self.path, self.endpoint_id, self.log = path, endpoint_id, log
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.broken: str | None = None
        self._readers: dict[int, object] = {}
        if not resumed:  # a SIGHUP re-exec continues the same MEP session
            self._line(f"uid={os.getuid()} pid={os.getpid()} eid={endpoint_id} Begin MEP session =====")

    def _line(self, text: str) -> None:
        if self.broken:
            return
        line = f"{_now()} {text}\n".encode()
        try:
            if (written := os.write(self.fd, line)) != len(line):  # a full disk can cut a record short
                raise OSError(28, f"short write ({written} of {len(line)} bytes; file system full?)")
        except OSError as e:
            self.broken = f"{self.path}: {e.strerror}"
            self.log.error("audit log write failed; refusing high-assurance starts until restart", error=self.broken)

    def watch(self, fd: int, uep) -> None:
        os.set_blocking(fd, False)
        self._readers[fd] = uep
        asyncio.get_running_loop().add_reader(fd, self._read, fd)

    def _read(self, fd: int) -> bool:
        """Copy one record; False at EOF (the reader is then closed)."""
        uep = self._readers.get(fd)
        try:
            record = os.read(fd, RECORD_MAX)
        except BlockingIOError:
            return True
        except OSError:
            record = b""
        if not record:
            self.unwatch(fd)
            return False
        text = record.replace(b"\n", b" ").replace(b"\r", b"").replace(b"\0", b"").decode("utf-8", "replace")
        self._line(f"uid={uep.uid} pid={uep.pid} uep={uep.endpoint_id} {text}")
        return True

    def watching(self, fd) -> bool:
        return fd in self._readers

    def drain(self, fd: int) -> None:
        """The UEP exited: copy what it left in the pipe, then close it."""
        while fd in self._readers and self._read(fd):
            pass

    def unwatch(self, fd: int) -> None:
        if self._readers.pop(fd, None) is not None:
            asyncio.get_running_loop().remove_reader(fd)
            os.close(fd)

    def close(self) -> None:
        for fd in list(self._readers):
            self.drain(fd)
        self._line(f"uid={os.getuid()} pid={os.getpid()} eid={self.endpoint_id} End MEP session -----")
        os.close(self.fd)
