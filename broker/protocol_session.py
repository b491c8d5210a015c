"""The broker's side of the helper protocol, I/O-free: answers the challenge, signs and
numbers every request, and can hand an authenticated session to a re-exec'd broker.

It lives with the broker, not in protocol/, because it never runs as root: the helper's
import closure holds only what the helper itself executes.
"""

from protocol import canonical, messages
from protocol.errors import ProtocolError
from protocol.framing import MAX_FRAME, encode_frame
from protocol.session import Session, hello_mac, request_mac


class InvalidRequest(Exception):
    """A request that breaks the protocol's rules or limits (`str()` names the field and the
    rule); it was not sent, and the session goes on."""


class BrokerSession(Session):
    """The broker's side: answers the challenge, signs and numbers every request."""

    def __init__(self, key: bytes, max_frame: int = MAX_FRAME):
        super().__init__(key, max_frame, "await-challenge")
        self.nonce = None
        self.send_limit = max_frame  # the helper's own frame cap, from its challenge
        self.helper_pam = ""  # the helper policy's PAM service ("" = off), from its challenge

    @classmethod
    def resume(cls, key: bytes, nonce: str, next_seq: int, buffered: str = "", send_limit: int = MAX_FRAME,
               helper_pam: str = ""):
        """Continue an authenticated session in a re-exec'd broker (see `export`)."""
        self = cls(key)
        self.nonce, self.next_seq, self.state = bytes.fromhex(nonce), next_seq, "ready"
        self.send_limit, self.helper_pam = send_limit, helper_pam
        if buffered:
            self.receive_data(bytes.fromhex(buffered))
        return self

    def export(self) -> dict:
        """What a new broker image needs to go on with this connection: the nonce, the
        next sequence number and the start of a frame that has only partly arrived (the
        helper may be writing an `exited` event just then). The caller must have no
        request half-sent and no event left unread."""
        self._expect("ready", "export")
        return {"nonce": self.nonce.hex(), "next_seq": self.next_seq, "buffered": bytes(self._reader._buf).hex(),
                "send_limit": self.send_limit, "helper_pam": self.helper_pam}

    def hello(self) -> bytes:
        self._expect("challenged", "hello")
        self.state = "ready"
        return self._frame(messages.Hello(messages.VERSION, hello_mac(self._key, self.nonce)))

    def send(self, request) -> bytes:
        """The signed frame of `request`. It is first checked as the helper will check it
        (the protocol's own decoder and limits, and the helper's frame cap): a request the
        helper would have to refuse as a protocol violation, fatal to the connection,
        raises InvalidRequest here instead, and takes no sequence number."""
        self._guard()
        if self.state != "ready" or not getattr(request, "REQUEST", False):
            raise ProtocolError(f"cannot send {type(request).__name__} in state {self.state!r}")
        try:
            wire = {**messages.to_wire(request), "seq": self.next_seq}
            unsigned = canonical.dumps(wire)
            messages.from_wire(canonical.loads(unsigned), envelope=("seq",))
            mac = request_mac(self._key, self.nonce, unsigned)
            frame = encode_frame(canonical.dumps({**wire, "mac": mac}), self.send_limit)
        except ProtocolError as e:
            raise InvalidRequest(str(e)) from None
        self.next_seq += 1
        return frame

    def _handle(self, obj):
        msg = messages.from_wire(obj)
        if self.state == "await-challenge":
            if not isinstance(msg, messages.Challenge):
                raise ProtocolError(f"expected challenge, got {msg.TYPE}")
            self.nonce, self.send_limit, self.helper_pam = bytes.fromhex(msg.nonce), msg.max_frame, msg.pam
            self.state = "challenged"
            return msg
        if self.state != "ready" or not isinstance(msg, messages.HELPER_EVENTS):
            raise ProtocolError(f"unexpected {msg.TYPE} in state {self.state!r}")
        return msg
