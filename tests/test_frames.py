"""Frames from a client, after a handshake answered below ASGI (``UpgradedWebSocket``).

The gateway parses its clients' frames itself once the HTTP protocol took the upgrade.
These tests write frames over raw sockets, well-formed and not, and hold every answer
against stock uvicorn's (``GATEWAY_RAW_WRITES=false``, websockets' parser, same app):
the same frames back (pongs, replies, the close frame with its code and reason), and
the connection closed or kept alike; a table of protocol violations, then randomised
runs of frames. Nothing a client sends leaves a connection counted after it is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import struct

import orjson
import pytest
from websockets.exceptions import PayloadTooBig
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol

from tests.conftest import MakeServer, RunningServer, eventually
from tests.test_handshake import TIMEOUT, standard, status, upgrade

pytestmark = pytest.mark.gateway_protocols

CONT, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
MASK = b"\x11\x22\x33\x44"
LAST = 999  # the id of the command that follows every run: its reply ends the reading


def frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    masked: bool = True,
    length: int | None = None,
) -> bytes:
    size = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | rsv << 4 | opcode])
    flag = 0x80 if masked else 0
    if size < 126:
        head += bytes([flag | size])
    elif size < 65536:
        head += bytes([flag | 126]) + struct.pack("!H", size)
    else:
        head += bytes([flag | 127]) + struct.pack("!Q", size)
    if not masked:
        return head + payload
    return head + MASK + bytes(b ^ MASK[i % 4] for i, b in enumerate(payload))


def command(n: int, op: str = "ping") -> bytes:
    return orjson.dumps({"id": n, "op": op})


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


Answer = tuple[list[tuple[int, object]], bool]


def readable(opcode: int, payload: bytes) -> tuple[int, object]:
    """A server frame, comparable across servers: replies by id, ok and error code."""
    if opcode == TEXT:
        message = orjson.loads(payload)
        error = message.get("error") or {}
        return opcode, (message.get("id"), message.get("ok"), error.get("code"))
    if opcode == CLOSE and len(payload) >= 2:
        return opcode, (struct.unpack("!H", payload[:2])[0], payload[2:].decode())
    return opcode, payload


async def server_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """The next frame the server writes (unmasked): its opcode and payload."""
    first = await asyncio.wait_for(reader.readexactly(2), TIMEOUT)
    size = first[1] & 0x7F
    if size == 126:
        size = struct.unpack("!H", await reader.readexactly(2))[0]
    elif size == 127:
        size = struct.unpack("!Q", await reader.readexactly(8))[0]
    return first[0] & 0x0F, await reader.readexactly(size)


async def exchange(
    port: int,
    writes: list[bytes],
    *,
    last: bytes = frame(TEXT, command(LAST)),
    end: tuple[int, object] = (TEXT, (LAST, True, None)),
) -> Answer:
    """Handshake, write each chunk and then ``last`` (by default a ``ping`` command);
    read until its answer ``end`` (the server answered all before it, and stays open) or
    the end of the connection (a close frame is answered, as a client does): the
    frames before that, and whether the server closed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    frames: list[tuple[int, object]] = []
    try:
        writer.write(upgrade(headers=standard()))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        assert status(head) == b"HTTP/1.1 101 Switching Protocols"
        for chunk in [*writes, last]:
            writer.write(chunk)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        while True:
            try:
                opcode, payload = await server_frame(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                return frames, True
            seen = readable(opcode, payload)
            if seen == end:
                return frames, False
            frames.append(seen)
            if seen[0] == CLOSE:
                with contextlib.suppress(ConnectionError):
                    writer.write(frame(CLOSE, payload))
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def alike(fast: Answer, stock: Answer) -> bool:
    """The same answers. Where the connection ends, stock uvicorn may drop replies the
    gateway sends: it parses a whole read before its app runs, so commands that came
    in the same read as a protocol violation or a close frame go unanswered there, and
    are answered here (the reader runs as each frame is parsed). So: the same control
    frames and the same end, and stock's replies the first of the gateway's."""
    (fast_frames, fast_closed), (stock_frames, stock_closed) = fast, stock
    if fast_closed != stock_closed:
        return False
    if not fast_closed:
        return fast_frames == stock_frames
    fast_replies = [f for f in fast_frames if f[0] == TEXT]
    stock_replies = [f for f in stock_frames if f[0] == TEXT]
    return [f for f in fast_frames if f[0] != TEXT] == [
        f for f in stock_frames if f[0] != TEXT
    ] and fast_replies[: len(stock_replies)] == stock_replies


HELLO = frame(TEXT, command(1))
CASES: dict[str, list[bytes]] = {
    "a command": [HELLO],
    "two frames in one write": [HELLO + frame(TEXT, command(2))],
    "a frame a byte at a time": [bytes([b]) for b in HELLO],
    "ping answered with its payload": [frame(PING, b"are you there")],
    "empty ping": [frame(PING)],
    "unsolicited pong ignored": [frame(PONG, b"x"), HELLO],
    "fragmented text with a ping between": [
        frame(TEXT, command(7)[:5], fin=False),
        frame(PING, b"mid"),
        frame(CONT, command(7)[5:9], fin=False),
        frame(CONT, command(7)[9:]),
    ],
    "binary frame": [frame(BINARY, b"\x00\x01")],
    "text that is not JSON": [frame(TEXT, b"hello")],
    "unmasked frame": [frame(TEXT, command(1), masked=False)],
    "reserved bit": [frame(TEXT, command(1), rsv=4)],
    "reserved opcode": [frame(0x3, b"x")],
    "control opcode 0xB": [frame(0xB)],
    "ping too long": [frame(PING, b"p" * 126)],
    "fragmented ping": [frame(PING, b"p", fin=False)],
    "continuation out of nowhere": [frame(CONT, b"x")],
    "text inside a fragmented text": [frame(TEXT, b"{", fin=False), frame(TEXT, b"{}")],
    "text not UTF-8": [frame(TEXT, b"\xff\xfe")],
    "fragments not UTF-8 together": [frame(TEXT, b"\xc3", fin=False), frame(CONT, b"(")],
    "UTF-8 split across fragments": [
        frame(TEXT, b'{"id": 3, "op": "ping", "x": "\xc3', fin=False),
        frame(CONT, b'\xa9"}'),
    ],
    "close, no payload": [frame(CLOSE)],
    "close 1000 with a reason": [frame(CLOSE, close_payload(1000, b"bye"))],
    "close 4000": [frame(CLOSE, close_payload(4000))],
    "close of one byte": [frame(CLOSE, b"\x03")],
    "close 1005 on the wire": [frame(CLOSE, close_payload(1005))],
    "close 999": [frame(CLOSE, close_payload(999))],
    "close 5000": [frame(CLOSE, close_payload(5000))],
    "close reason not UTF-8": [frame(CLOSE, close_payload(1000, b"\xff"))],
    "close then more frames": [frame(CLOSE, close_payload(1000)) + HELLO],
    "command after a bad frame": [frame(TEXT, b"[]"), HELLO],
}


@pytest.mark.parametrize("name", list(CASES))
async def test_frames_get_what_stock_uvicorn_answers(
    stock_pair: tuple[RunningServer, RunningServer], name: str
) -> None:
    fast, stock = [await exchange(s.port, CASES[name]) for s in stock_pair]
    assert alike(fast, stock), (name, fast, stock)
    for server in stock_pair:
        await eventually(lambda s=server: s.gateway.connections.total == 0)  # type: ignore[misc]


async def test_protocol_violations_are_closed_with_websockets_codes(
    stock_pair: tuple[RunningServer, RunningServer],
) -> None:
    """Not only alike: what the answers are (one case each, on the gateway)."""
    fast = stock_pair[0]
    expected = {
        "unmasked frame": (1002, "incorrect masking"),
        "reserved bit": (1002, "reserved bits must be 0"),
        "reserved opcode": (1002, "invalid opcode"),
        "ping too long": (1002, "control frame too long"),
        "fragmented ping": (1002, "fragmented control frame"),
        "continuation out of nowhere": (1002, "unexpected continuation frame"),
        "text inside a fragmented text": (1002, "expected a continuation frame"),
        "close of one byte": (1002, "close frame too short"),
        "close 1005 on the wire": (1002, "invalid status code"),
    }
    for name, close in expected.items():
        frames, closed = await exchange(fast.port, CASES[name])
        assert frames == [(CLOSE, close)] and closed, name
    frames, closed = await exchange(fast.port, CASES["close 1000 with a reason"])
    assert frames == [(CLOSE, (1000, "bye"))] and closed
    frames, closed = await exchange(fast.port, CASES["fragmented text with a ping between"])
    assert frames == [(PONG, b"mid"), (TEXT, (7, True, None))] and not closed


async def test_a_message_over_the_limit_is_refused_from_its_header(
    make_server: MakeServer,
) -> None:
    """1009 ``message too big`` as soon as a frame's header says so (no payload read),
    and for fragments whose sum passes the limit."""
    server = await make_server(max_message_bytes=1000)
    for writes in (
        [frame(TEXT, length=1001)],
        [frame(TEXT, length=70_000)],
        [frame(TEXT, b"x" * 600, fin=False), frame(CONT, b"y" * 401)],
    ):
        frames, closed = await exchange(server.port, writes)
        assert frames == [(CLOSE, (1009, "message too big"))] and closed
    frames, closed = await exchange(server.port, [frame(TEXT, b" " * 980 + command(1))])
    assert frames == [(TEXT, (1, True, None))] and not closed
    await eventually(lambda: server.gateway.connections.total == 0)


def random_frames(rng: random.Random) -> list[bytes]:
    """A run of frames, most of them valid, some broken in one way."""
    writes = []
    for n in range(rng.randint(1, 6)):
        kind = rng.random()
        if kind < 0.35:
            payload = command(n, rng.choice(["ping", "subscribe", "nope"]))
            writes.append(frame(TEXT, payload))
        elif kind < 0.5:
            data = command(n)
            cut = rng.randint(1, len(data) - 1)
            writes.append(frame(TEXT, data[:cut], fin=False) + frame(CONT, data[cut:]))
        elif kind < 0.6:
            writes.append(frame(PING, rng.randbytes(rng.randint(0, 125))))
        elif kind < 0.7:
            writes.append(frame(BINARY, rng.randbytes(rng.randint(0, 40))))
        elif kind < 0.8:
            writes.append(frame(TEXT, rng.randbytes(rng.randint(1, 20))))
        elif kind < 0.9:
            opcode = rng.choice([CONT, TEXT, 0x3, 0x7, PING, PONG, 0xF])
            writes.append(
                frame(
                    opcode,
                    rng.randbytes(rng.randint(0, 130)),
                    fin=rng.random() < 0.7,
                    rsv=rng.choice([0, 0, 1, 2, 4]),
                    masked=rng.random() < 0.8,
                )
            )
        else:
            code = rng.choice([1000, 1001, 1005, 1006, 1012, 2000, 3000, 4999, 5000])
            writes.append(frame(CLOSE, close_payload(code, rng.choice([b"", b"ok", b"\xff"]))))
    if rng.random() < 0.3:  # the whole run cut into random pieces
        data, writes = b"".join(writes), []
        while data:
            cut = rng.randint(1, max(1, len(data)))
            writes.append(data[:cut])
            data = data[cut:]
    return writes


def websockets_answers(data: bytes, max_size: int) -> Answer:
    """What websockets' own parser answers ``data`` with, fed one byte at a time so that
    each frame is handled as it completes, as the gateway handles it: the control frames
    it sends (pongs, a close) and whether it ends the connection. Text that is not UTF-8
    ends it with 1007, as uvicorn does on decoding it; too big, with the contract's 1009."""
    conn = ServerProtocol(state=State.OPEN, max_size=max_size)
    sent = b""
    text: list[bytes] | None = None  # the fragments of a text message
    for n in range(len(data)):
        conn.receive_data(data[n : n + 1])
        for event in conn.events_received():
            assert isinstance(event, Frame)
            if event.opcode == Opcode.TEXT:
                text = [bytes(event.data)]
            elif event.opcode == Opcode.BINARY:
                text = None
            elif event.opcode == Opcode.CONT and text is not None:
                text.append(bytes(event.data))
            if text is None or not event.fin or event.opcode not in (Opcode.TEXT, Opcode.CONT):
                continue
            message, text = b"".join(text), None
            try:
                message.decode()
            except UnicodeDecodeError:
                sent += b"".join(conn.data_to_send())
                return [*control_frames(sent), (CLOSE, (1007, ""))], True
        sent += b"".join(conn.data_to_send())
        if conn.parser_exc is not None or conn.state is not State.OPEN:
            frames = control_frames(sent)
            if isinstance(conn.parser_exc, PayloadTooBig):
                frames[-1] = (CLOSE, (1009, "message too big"))
            return frames, True
    return control_frames(sent), False


def control_frames(data: bytes) -> list[tuple[int, object]]:
    frames = []
    while data:
        size, at = data[1] & 0x7F, 2
        if size == 126:
            size, at = struct.unpack_from("!H", data, 2)[0], 4
        frames.append(readable(data[0] & 0x0F, data[at : at + size]))
        data = data[at + size :]
    return [f for f in frames if f[0] != TEXT]


async def test_randomised_frames_are_parsed_as_websockets_parses_them(
    make_server: MakeServer,
) -> None:
    """Runs of random frames against websockets' parser as the reference: the same pongs,
    the same close frame, the same end. (Replies are the app's: the table above compares
    those with stock uvicorn's. Bad frames never close here: 4002 is the app's too.)"""
    server = await make_server(max_message_bytes=4096, max_bad_frames=1000)
    rng = random.Random(6455)
    for _ in range(60):
        data = b"".join(random_frames(rng))
        expected = websockets_answers(data + frame(PING, b"end"), 4096)
        if not expected[1]:  # open: the last pong marks the end of the answers
            assert expected[0][-1] == (PONG, b"end")
        end = (PONG, b"end")  # a control frame: allowed inside a fragmented message too
        frames, closed = await exchange(server.port, [data], last=frame(PING, b"end"), end=end)
        got = [f for f in frames if f[0] != TEXT] + ([] if closed else [end])
        assert (got, closed) == expected, data
    await eventually(lambda: server.gateway.connections.total == 0)


def test_switching_head_is_websockets_accept_with_the_servers_headers() -> None:
    """The 101 head: websockets' ``accept_key`` of each key, then the default headers of
    the list it is given (remade when the server's list is a new one, as each second)."""
    import base64
    import os

    from websockets.utils import accept_key

    from gateway.server.frames import SWITCHING, switching_head

    first = [(b"date", b"Fri, 04 Dec 2026 19:00:00 GMT"), (b"Server", b"uvicorn")]
    second = [(b"date", b"Fri, 04 Dec 2026 19:00:01 GMT"), (b"Server", b"uvicorn")]
    for defaults in (first, first, second, first):
        for _ in range(20):
            key = base64.b64encode(os.urandom(16)).decode()
            lines = b"".join(name.lower() + b": " + value + b"\r\n" for name, value in defaults)
            expected = SWITCHING + f"Sec-WebSocket-Accept: {accept_key(key)}\r\n".encode()
            assert switching_head(key, defaults) == expected + lines + b"\r\n"


def _refused_while_sending(port: int, first: list[bytes], more: int) -> tuple[bytes, bool]:
    """A client in a thread of its own (so that it writes while the server reads, as a
    client in another process does): handshake, ``first``, then ``more`` frames of 60 KB
    written whatever happens; then everything it can still read (until the server's end,
    or two seconds of silence). And whether the connection was reset on the way."""
    import socket

    reset = False
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(upgrade(headers=standard()))
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(4096)
        received = head.partition(b"\r\n\r\n")[2]
        try:
            for chunk in first:
                sock.sendall(chunk)
            for _ in range(more):
                sock.sendall(frame(TEXT, b"x" * 60_000))
        except (ConnectionResetError, BrokenPipeError):
            reset = True
        sock.settimeout(2.0)
        try:
            while data := sock.recv(65536):
                received += data
        except ConnectionResetError:
            reset = True
        except TimeoutError:
            pass  # no end from the server (stock uvicorn waits for the client's close frame)
    return received, reset


async def test_a_client_that_goes_on_writing_past_the_limit_reads_its_1009_and_no_reset(
    stock_pair: tuple[RunningServer, RunningServer], make_server: MakeServer
) -> None:
    """A message over the limit, and the client goes on writing (pipelined frames, the
    rest of a fragmented message): the server must not close with the client's bytes
    unread, or the kernel answers them with a reset, which can destroy the close frame
    before the client reads it (a 1006 where 1009 is owed). The close frame is followed
    by the server's end of the connection (FIN), and what the client still sends is read
    and dropped. (Stock mode refuses the message in the app once it was received, with a
    closing handshake: no reset either. Fragments: not there, the message never ends.)"""
    limit = stock_pair[0].settings.max_message_bytes
    one_frame = [frame(TEXT, b"x" * (limit + 1))]
    fragments = [frame(TEXT, b"x" * 1000, fin=False)]
    fragments += [frame(CONT, b"y" * 1000, fin=False) for _ in range(limit // 1000 + 1)]
    too_big = frame(CLOSE, close_payload(1009, b"message too big"), masked=False)
    invalid = frame(CLOSE, close_payload(1002, b"invalid opcode"), masked=False)
    fast, stock = stock_pair
    runs = [(fast, one_frame, too_big), (fast, fragments, too_big), (stock, one_frame, too_big)]
    # Without httptools, the gateway's WebSocket protocol on websockets' parser answers.
    h11 = await make_server(uvicorn_options={"http": "h11"})
    runs += [(h11, one_frame, too_big), (h11, [frame(0x3)], invalid)]
    for server, first, close in runs:
        for _ in range(3):
            received, reset = await asyncio.to_thread(
                _refused_while_sending, server.port, first, 50
            )
            assert received.endswith(close), (server.settings.raw_writes, received[-40:])
            assert not reset, server.settings.raw_writes
        gateway = server.gateway
        await eventually(lambda: gateway.connections.total == 0)  # noqa: B023 (awaited here)
