"""The helper's I/O-free session machine (h11 style) and the base it shares with the
broker's (broker/protocol_session.py). Handshake and MAC rules: docs/root-code.md.

    helper:  start --challenge()--> await-hello --Hello--> ready --requests...
"""

import hashlib
import hmac
import os

from protocol import canonical, messages
from protocol.errors import ProtocolError
from protocol.framing import MAX_FRAME, FrameReader, encode_frame

KEY_BYTES = 32


class NEED_DATA:
    """next_event(): no complete frame yet; feed more bytes."""


class CLOSED:
    """next_event(): the peer closed cleanly, at a frame boundary."""


def hello_mac(key: bytes, nonce: bytes) -> str:
    return hmac.new(key, b"mep-hello\0" + nonce, hashlib.sha256).hexdigest()


def request_mac(key: bytes, nonce: bytes, unsigned_body: bytes) -> str:
    return hmac.new(key, b"mep-req\0" + nonce + unsigned_body, hashlib.sha256).hexdigest()


class Session:
    """Framing, the end-of-stream rule and the error latch, for either side."""

    def __init__(self, key: bytes, max_frame: int, state: str):
        if type(key) is not bytes or len(key) != KEY_BYTES:
            raise ValueError(f"the session key must be exactly {KEY_BYTES} bytes")
        self._key, self._max_frame, self._reader = key, max_frame, FrameReader(max_frame)
        self._eof, self.state, self.next_seq = False, state, 1

    @property
    def partial(self) -> bool:
        return self._reader.partial

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the peer; b"" means the peer closed its side."""
        self._guard()
        self._eof = self._eof or not data
        try:
            self._reader.feed(data)
        except ProtocolError:
            self.state = "error"
            raise

    def next_event(self):
        self._guard()
        try:
            body = self._reader.next_frame()
            if body is None:
                if self._eof:
                    self._reader.close()
                    self.state = "closed"
                    return CLOSED
                return NEED_DATA
            return self._handle(canonical.loads(body))
        except ProtocolError:
            self.state = "error"
            raise

    def _frame(self, msg, **envelope) -> bytes:
        return encode_frame(canonical.dumps({**messages.to_wire(msg), **envelope}), self._max_frame)

    def _guard(self):
        if self.state in ("error", "closed"):
            raise ProtocolError(f"session is {self.state}")

    def _expect(self, state, action):
        if self.state != state:
            current, self.state = self.state, "error"
            raise ProtocolError(f"{action} is not allowed in state {current!r}")


class HelperSession(Session):
    """The helper's side: issues the challenge, authenticates every request."""

    def __init__(self, key: bytes, max_frame: int = MAX_FRAME, pam: str = ""):
        super().__init__(key, max_frame, "start")
        self.nonce = os.urandom(32)  # = secrets.token_bytes, without loading `random`
        self.pam = pam  # announced, so that the broker can refuse a config.yaml that disagrees

    def challenge(self) -> bytes:
        self._expect("start", "challenge")
        self.state = "await-hello"
        return self._frame(messages.Challenge(messages.VERSION, self.nonce.hex(), self._max_frame, self.pam))

    def send(self, event) -> bytes:
        self._guard()
        if self.state != "ready" or not isinstance(event, messages.HELPER_EVENTS):
            raise ProtocolError(f"cannot send {type(event).__name__} in state {self.state!r}")
        return self._frame(event)

    def _handle(self, obj):
        if type(obj) is not dict:
            raise ProtocolError("message is not an object")
        type_name = obj.get("type")
        if self.state == "await-hello":
            if type_name != "hello":
                raise ProtocolError(f"expected hello, got {str(type_name)[:40]!r}")
            hello = messages.from_wire(obj)
            if not hmac.compare_digest(hello.mac, hello_mac(self._key, self.nonce)):
                raise ProtocolError("hello: bad MAC (wrong key?)")
            self.state = "ready"
            return hello
        if self.state != "ready":
            raise ProtocolError(f"no message expected in state {self.state!r}")
        if type_name == "hello":
            raise ProtocolError("second hello")
        cls = messages.REGISTRY.get(type_name) if type(type_name) is str else None
        if cls is None or not cls.REQUEST:
            raise ProtocolError(f"{str(type_name)[:40]!r} is not a request")
        seq, mac = obj.get("seq"), obj.get("mac")
        if type(mac) is not str or not messages.HEX64_RE.fullmatch(mac):
            raise ProtocolError("request without a well-formed mac")
        unsigned = canonical.dumps({k: v for k, v in obj.items() if k != "mac"})
        if not hmac.compare_digest(mac, request_mac(self._key, self.nonce, unsigned)):
            raise ProtocolError("request: bad MAC")
        if type(seq) is not int or seq != self.next_seq:
            raise ProtocolError(f"request seq {seq!r}, expected {self.next_seq} (replayed or skipped)")
        request = messages.from_wire(obj, envelope=("seq", "mac"))
        self.next_seq += 1
        return request
