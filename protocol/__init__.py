"""The helper protocol: framing, a strict canonical-JSON codec, typed messages and an
I/O-free session state machine (in the style of h11) that the root helper and the
unprivileged broker both drive (the broker's own machine is broker/session.py). Stdlib only;
nothing here touches a socket."""

from protocol.errors import ProtocolError
from protocol.framing import FrameReader, encode_frame
from protocol.messages import Challenge, Exited, Hello, Ping, Pong, Refused, Signal, Signaled, Spawn, Spawned
from protocol.session import CLOSED, NEED_DATA, HelperSession

__all__ = ["ProtocolError", "FrameReader", "encode_frame", "Challenge", "Exited", "Hello", "Ping", "Pong", "Refused",
           "Signal", "Signaled", "Spawn", "Spawned", "HelperSession", "NEED_DATA", "CLOSED"]
