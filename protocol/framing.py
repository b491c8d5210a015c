"""u32 big-endian length, then the body. Bad lengths are refused as soon as the header
arrives, so a peer cannot make us buffer more than one frame."""

import struct

from protocol.errors import ProtocolError

HEADER = struct.Struct(">I")
MAX_FRAME = 1 << 20  # 1 MiB, the protocol's hard ceiling; policy may set it lower


def encode_frame(body: bytes, max_body: int = MAX_FRAME) -> bytes:
    if not 0 < len(body) <= max_body:
        raise ProtocolError(f"frame body of {len(body)} bytes is outside 1..{max_body}")
    return HEADER.pack(len(body)) + body


class FrameReader:
    """Accumulates bytes and yields complete frame bodies."""

    def __init__(self, max_body: int = MAX_FRAME):
        if not 0 < max_body <= MAX_FRAME:
            raise ValueError(f"max_body must be in 1..{MAX_FRAME}")
        self.max_body, self._buf = max_body, bytearray()

    @property
    def partial(self) -> bool:
        """True while part of a frame has arrived: the slow-loris timer runs then."""
        return bool(self._buf)

    def feed(self, data: bytes) -> None:
        self._buf += data
        self._check_header()

    def next_frame(self) -> bytes | None:
        if len(self._buf) < HEADER.size:
            return None
        (length,) = HEADER.unpack_from(self._buf)
        end = HEADER.size + length
        if len(self._buf) < end:
            return None
        body = bytes(self._buf[HEADER.size:end])
        del self._buf[:end]
        self._check_header()
        return body

    def close(self) -> None:
        """The peer closed its side: anything still buffered is a truncated frame."""
        if self._buf:
            raise ProtocolError(f"connection closed inside a frame ({len(self._buf)} bytes pending)")

    def _check_header(self) -> None:
        if len(self._buf) >= HEADER.size:
            (length,) = HEADER.unpack_from(self._buf)
            if length == 0:
                raise ProtocolError("zero-length frame")
            if length > self.max_body:
                raise ProtocolError(f"frame of {length} bytes exceeds the limit of {self.max_body}")
