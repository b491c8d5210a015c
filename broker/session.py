"""The broker's side of the helper protocol, I/O-free: answers the challenge, signs and
numbers every request, and can hand an authenticated session to a re-exec'd broker.

It lives with the broker, not in protocol/, because it never runs as root: the helper's
import closure holds only what the helper itself executes.
"""

from protocol import canonical, messages
from protocol.errors import ProtocolError
from protocol.framing import MAX_FRAME
from protocol.session import Session, hello_mac, request_mac


class BrokerSession(Session):
    """The broker's side: answers the challenge, signs and numbers every request."""

    def __init__(self, key: bytes, max_frame: int = MAX_FRAME):
        super().__init__(key, max_frame, "await-challenge")
        self.nonce = None

    @classmethod
    def resume(cls, key: bytes, nonce: str, next_seq: int, buffered: str = "", max_frame: int = MAX_FRAME):
        """Continue an authenticated session in a re-exec'd broker (see `export`)."""
        self = cls(key, max_frame)
        self.nonce, self.next_seq, self.state = bytes.fromhex(nonce), next_seq, "ready"
        if buffered:
            self.receive_data(bytes.fromhex(buffered))
        return self

    def export(self) -> dict:
        """What a new broker image needs to go on with this connection: the nonce, the
        next sequence number and the start of a frame that has only partly arrived (the
        helper may be writing an `exited` event just then). The caller must have no
        request half-sent and no event left unread."""
        self._expect("ready", "export")
        return {"nonce": self.nonce.hex(), "next_seq": self.next_seq, "buffered": bytes(self._reader._buf).hex()}

    def hello(self) -> bytes:
        self._expect("challenged", "hello")
        self.state = "ready"
        return self._frame(messages.Hello(messages.VERSION, hello_mac(self._key, self.nonce)))

    def send(self, request) -> bytes:
        self._guard()
        if self.state != "ready" or not getattr(request, "REQUEST", False):
            raise ProtocolError(f"cannot send {type(request).__name__} in state {self.state!r}")
        seq, self.next_seq = self.next_seq, self.next_seq + 1
        mac = request_mac(self._key, self.nonce, canonical.dumps({**messages.to_wire(request), "seq": seq}))
        return self._frame(request, seq=seq, mac=mac)

    def _handle(self, obj):
        msg = messages.from_wire(obj)
        if self.state == "await-challenge":
            if not isinstance(msg, messages.Challenge):
                raise ProtocolError(f"expected challenge, got {msg.TYPE}")
            self.nonce = bytes.fromhex(msg.nonce)
            self.state = "challenged"
            return msg
        if self.state != "ready" or not isinstance(msg, messages.HELPER_EVENTS):
            raise ProtocolError(f"unexpected {msg.TYPE} in state {self.state!r}")
        return msg
