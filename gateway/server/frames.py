"""RFC 6455 framing for the gateway's lean WebSocket protocol (``gateway.server.upgraded``):
the 101 head, a client's frames and close frames read as websockets reads them, control
frames."""

from __future__ import annotations

import struct
from binascii import b2a_base64
from hashlib import sha1
from typing import Final

from websockets.frames import EXTERNAL_CLOSE_CODES

from gateway.errors import CloseCode
from gateway.server.response_head import DefaultHeaders, MadeFrom

try:  # websockets' C extension, as its own parser uses it
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - a websockets build without it
    from websockets.utils import apply_mask

# (Final: compiled code reads them as constants, not from the module's dictionary.)
_EXTERNAL_CLOSE_CODES: Final = EXTERNAL_CLOSE_CODES  # the codes a client may send
CONT: Final = 0x0
TEXT: Final = 0x1
BINARY: Final = 0x2
CLOSE: Final = 0x8
PING: Final = 0x9
PONG: Final = 0xA
DATA_OPCODES: Final = (CONT, TEXT, BINARY)
CONTROL_OPCODES: Final = (CLOSE, PING, PONG)


# The 101 as uvicorn writes it on websocket.accept, up to the accept key; uvicorn's default
# headers (date, server) follow it.
SWITCHING: Final = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
)
GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455's
_ACCEPT_LINE: Final = SWITCHING + b"Sec-WebSocket-Accept: "


def _ending(default_headers: DefaultHeaders) -> bytes:
    """uvicorn's default headers as a 101's last lines, through its blank line."""
    lines = [name.lower() + b": " + value + b"\r\n" for name, value in default_headers]
    return b"".join(lines) + b"\r\n"


_ENDING: Final = MadeFrom(_ending)


def switching_head(key: str, default_headers: list[tuple[bytes, bytes]]) -> bytes:
    """The 101 for a handshake whose (valid) ``Sec-WebSocket-Key`` is ``key``: websockets'
    ``accept_key`` of it, with neither its text round trip nor a list joined per head."""
    accept = b2a_base64(sha1(key.encode() + GUID).digest(), newline=False)
    return b"".join((_ACCEPT_LINE, accept, b"\r\n", _ENDING.get(default_headers)))


class ProtocolViolation(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason


def read_frame(data: bytes, at: int, room: int) -> tuple[int, bytes, int] | None:
    """The client frame starting at ``at`` (two bytes or more): its first byte, its
    unmasked payload and where it ends; None while it is incomplete. A frame that is
    not a client's, or whose length goes past ``room``, is refused from its header."""
    head1, head2 = data[at], data[at + 1]
    opcode = head1 & 0x0F
    if opcode not in DATA_OPCODES and opcode not in CONTROL_OPCODES:
        raise ProtocolViolation(1002, "invalid opcode")
    if not head2 & 0x80:
        raise ProtocolViolation(1002, "incorrect masking")
    size, length, start = len(data), head2 & 0x7F, at + 2
    if length == 126:
        if size - start < 2:
            return None
        (length,) = struct.unpack_from("!H", data, start)
        start += 2
    elif length == 127:
        if size - start < 8:
            return None
        (length,) = struct.unpack_from("!Q", data, start)
        start += 8
    if length > room:
        raise ProtocolViolation(*CloseCode.MESSAGE_TOO_BIG)
    end = start + 4 + length
    if size < end:
        return None
    return head1, apply_mask(data[start + 4 : end], data[start : start + 4]), end


def control_frame(opcode: int, payload: bytes) -> bytes:
    return bytes((0x80 | opcode, len(payload))) + payload


def close_payload(code: int, reason: str) -> bytes:
    return struct.pack("!H", code) + reason.encode()


def parse_close(payload: bytes) -> tuple[int, str]:
    """A close frame's code and reason, as websockets' ``Close.parse`` reads them."""
    if not payload:
        return 1005, ""
    if len(payload) == 1:
        raise ProtocolViolation(1002, "close frame too short")
    code = payload[0] << 8 | payload[1]  # big-endian, as struct's "!H"
    try:
        reason = payload[2:].decode()
    except UnicodeDecodeError as exc:
        raise ProtocolViolation(1007, f"{exc.reason} at position {exc.start}") from None
    if not (code in _EXTERNAL_CLOSE_CODES or 3000 <= code < 5000):
        raise ProtocolViolation(1002, "invalid status code")
    return code, reason
