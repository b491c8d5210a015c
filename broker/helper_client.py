"""The broker's side of the helper connection, for asyncio.

Drives broker.protocol_session.BrokerSession over the inherited socket: answers the challenge, signs
requests, matches replies to requests by id, and hands `exited` events to a callback.
File descriptors that arrive with `spawned` (SCM_RIGHTS) are queued in arrival order and
given to the reply they came with.
"""

from __future__ import annotations

import asyncio
import collections
import os
import socket
from typing import Callable

from broker.protocol_session import BrokerSession, InvalidRequest  # noqa: F401 - raised by requests
from protocol.errors import ProtocolError
from protocol.session import CLOSED, NEED_DATA
from protocol.messages import CHANNELS, Challenge, Exited, Refused, Signal, Spawn, Spawned, Title

MAX_FDS_PER_READ = 16


class HelperRefused(Exception):
    """The helper refused a request; `code` and `reason` are the helper's words."""

    def __init__(self, code: str, reason: str):
        super().__init__(f"refused ({code}): {reason}")
        self.code, self.reason = code, reason


class HelperGone(Exception):
    """The helper connection is closed; nothing more can be spawned."""


class SpawnResult:
    def __init__(self, pid: int, fds: dict):
        self.pid = pid
        self.fds = fds  # channel name -> fd owned by the caller ("cred": memfd, "audit": pipe)


class HelperClient:
    def __init__(self, sock: socket.socket, key: bytes, on_exit: Callable[[int, int], None] | None = None,
                 session: BrokerSession | None = None):
        self.sock = sock
        self.sock.setblocking(False)
        self.session = session or BrokerSession(key)
        self.on_exit = on_exit or (lambda pid, status: None)
        self.ready = asyncio.get_running_loop().create_future()
        self.closed = asyncio.get_running_loop().create_future()
        self._pending: dict[str, asyncio.Future] = {}
        self.idle = asyncio.Event()  # set while no request awaits its reply (a re-exec may only happen then)
        self.idle.set()
        self._fds: collections.deque[int] = collections.deque()
        self.next_req = 1  # request ids go on across a re-exec, for readable logs
        self._send_lock = asyncio.Lock()
        if self.session.state == "ready":
            self.ready.set_result(None)
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self._on_readable)

    @classmethod
    async def connect_fd(cls, fd: int, key: bytes, on_exit=None) -> "HelperClient":
        client = cls(socket.socket(fileno=fd), key, on_exit)
        await client.ready
        return client

    # -- requests ---------------------------------------------------------------------

    async def spawn(self, username: str, uid: int, name: str, env: dict | None = None,
                    stdin: bytes = b"", channels=CHANNELS) -> SpawnResult:
        return await self._request(lambda req: Spawn(req, username, uid, name, dict(env or {}), stdin, tuple(channels)))

    async def signal(self, pid: int, sig: str = "TERM") -> None:
        await self._request(lambda req: Signal(req, pid, sig))

    async def title(self, endpoint_id: str, name: str) -> None:
        await self._request(lambda req: Title(req, endpoint_id, name))

    async def _request(self, build):
        """Send one request and wait for its reply. A request that breaks the protocol's
        rules raises InvalidRequest before it takes a sequence number or a reply slot:
        that request fails, the connection and every other request go on."""
        req, self.next_req = f"r{self.next_req}", self.next_req + 1
        async with self._send_lock:  # sequence numbers in the order the frames go out
            if self.closed.done():
                raise HelperGone("the helper connection is closed")
            data = self.session.send(build(req))  # raises InvalidRequest
            future = self._pending[req] = asyncio.get_running_loop().create_future()
            self.idle.clear()
            try:  # shielded: a frame cut in half by a cancellation would break the stream
                await asyncio.shield(asyncio.get_running_loop().sock_sendall(self.sock, data))
            except OSError as e:
                self._close(HelperGone(f"writing to the helper: {e}"))
        return await future

    # -- events -----------------------------------------------------------------------

    def _on_readable(self) -> None:
        try:
            data, fds, _flags, _addr = socket.recv_fds(self.sock, 65536, MAX_FDS_PER_READ)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            return self._close(HelperGone(f"reading from the helper: {e}"))
        self._fds.extend(fds)
        try:
            self.session.receive_data(data)
            while (event := self.session.next_event()) is not NEED_DATA:
                if event is CLOSED:
                    return self._close(HelperGone("the helper closed the connection"))
                self._dispatch(event)
        except ProtocolError as e:
            self._close(HelperGone(f"protocol error from the helper: {e}"))
        finally:  # after the replies: their requesters run before a re-exec that waits for idle
            self._check_idle()

    def _dispatch(self, event) -> None:
        if isinstance(event, Challenge):
            self.sock.sendall(self.session.hello())  # a few bytes into an empty socket buffer
            self.ready.set_result(None)
        elif isinstance(event, Exited):
            self.on_exit(event.pid, event.status)
        else:
            future = self._pending.pop(event.req, None)
            if isinstance(event, Spawned):
                fds = {name: self._fds.popleft() for name in event.channels}
                if future is None or future.done():
                    for fd in fds.values():
                        os.close(fd)
                else:
                    future.set_result(SpawnResult(event.pid, fds))
            elif future is not None and not future.done():
                if isinstance(event, Refused):
                    future.set_exception(HelperRefused(event.code, event.reason))
                else:
                    future.set_result(event)

    def _check_idle(self) -> None:
        if not self._pending:
            self.idle.set()

    def _close(self, error: Exception) -> None:
        if self.closed.done():
            return
        asyncio.get_running_loop().remove_reader(self.sock.fileno())
        for future in [self.ready, *self._pending.values()]:
            if not future.done():
                future.set_exception(error)
        self._pending.clear()
        self._check_idle()
        while self._fds:
            os.close(self._fds.popleft())
        self.closed.set_result(error)

    def close(self) -> None:
        self._close(HelperGone("closed by the broker"))
        self.sock.close()
