"""RFC 6455 framing for the gateway's lean WebSocket protocol (``gateway.server.upgraded``):
the 101 head, control frames, close frames read as websockets reads them."""

from __future__ import annotations

import struct

from websockets.frames import EXTERNAL_CLOSE_CODES

CONT, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
DATA_OPCODES = (CONT, TEXT, BINARY)
CONTROL_OPCODES = (CLOSE, PING, PONG)


# The 101 as uvicorn writes it on websocket.accept, up to the accept key; uvicorn's default
# headers (date, server) follow it.
SWITCHING = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"


def switching_head(accept: str, default_headers: list[tuple[bytes, bytes]]) -> bytes:
    head = [SWITCHING, b"Sec-WebSocket-Accept: ", accept.encode(), b"\r\n"]
    for name, value in default_headers:
        head += [name.lower(), b": ", value, b"\r\n"]
    head.append(b"\r\n")
    return b"".join(head)


class ProtocolViolation(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason


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
    (code,) = struct.unpack_from("!H", payload)
    try:
        reason = payload[2:].decode()
    except UnicodeDecodeError as exc:
        raise ProtocolViolation(1007, f"{exc.reason} at position {exc.start}") from None
    if not (code in EXTERNAL_CLOSE_CODES or 3000 <= code < 5000):
        raise ProtocolViolation(1002, "invalid status code")
    return code, reason
