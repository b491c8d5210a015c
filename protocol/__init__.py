"""The helper protocol: framing, a strict canonical-JSON codec, typed messages and an
I/O-free session state machine (in the style of h11) that both the root helper and the
unprivileged broker drive.

Stdlib only. Nothing here reads or writes a socket: callers feed bytes in and get bytes
and events out, so every rule can be tested without a process.
"""

from protocol.errors import ProtocolError
from protocol.framing import FrameReader, encode_frame
from protocol.messages import (
    Challenge,
    Exited,
    Hello,
    Ping,
    Pong,
    Refused,
    Signal,
    Signaled,
    Spawn,
    Spawned,
)
from protocol.session import BrokerSession, HelperSession, NEED_DATA, CLOSED

__all__ = [
    "ProtocolError",
    "FrameReader",
    "encode_frame",
    "Challenge",
    "Exited",
    "Hello",
    "Ping",
    "Pong",
    "Refused",
    "Signal",
    "Signaled",
    "Spawn",
    "Spawned",
    "BrokerSession",
    "HelperSession",
    "NEED_DATA",
    "CLOSED",
]
