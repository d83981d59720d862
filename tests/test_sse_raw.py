"""Raw SSE body writes (``gateway.server.http``) under the real server.

The streams are read from a plain socket and de-chunked here, so that the tests see
the exact bytes on the wire: the chunk framing the raw path writes itself, the events
inside, and the ``0\\r\\n\\r\\n`` terminator that ASGI still writes at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from channels.publication import StreamPosition
from gateway import cursor
from gateway.server.cycle import RawBody
from gateway.server.front import FrontDoor
from gateway.server.http import GatewayHttpToolsProtocol
from gateway.wire import frame_chunk
from tests.conftest import RunningServer, eventually, token
from tests.helpers import api_client, api_publish, bearer, sse_params
from tests.socket_writes import SocketWrites, watch_socket_writes

pytestmark = pytest.mark.gateway_protocols  # what these tests are about

TIMEOUT = 10.0
SIZE_LINE = re.compile(rb"[0-9a-f]+\r\n")


class RawSse:
    """One ``GET /sse`` over a plain socket: the response head, then one body chunk at a time."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()
        self.eof = False
        self.status = 0
        self.headers: dict[bytes, bytes] = {}

    async def _fill(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        data = await asyncio.wait_for(loop.sock_recv(self.sock, 65536), timeout)
        if not data:
            self.eof = True
            raise EOFError("connection closed")
        self.buffer += data

    async def _until(self, marker: bytes, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        while (end := self.buffer.find(marker)) < 0:
            await self._fill(max(0.001, deadline - time.monotonic()))
        data = bytes(self.buffer[: end + len(marker)])
        del self.buffer[: end + len(marker)]
        return data

    async def _exactly(self, size: int, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        while len(self.buffer) < size:
            await self._fill(max(0.001, deadline - time.monotonic()))
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    async def head(self, timeout: float = TIMEOUT) -> None:
        raw = await self._until(b"\r\n\r\n", timeout)
        status_line, *lines = raw[:-4].split(b"\r\n")
        self.status = int(status_line.split()[1])
        for line in lines:
            name, _, value = line.partition(b":")
            self.headers[name.strip().lower()] = value.strip()

    async def chunk(self, timeout: float = TIMEOUT) -> bytes:
        """The next chunk's data, checked for exact framing; b"" for the terminator."""
        size_line = await self._until(b"\r\n", timeout)
        assert SIZE_LINE.fullmatch(size_line), size_line
        size = int(size_line[:-2], 16)
        data = await self._exactly(size + 2, timeout)
        assert data[-2:] == b"\r\n", data[-20:]
        if size == 0:
            assert data == b"\r\n"
        return data[:-2]

    async def chunks(self, count: int, timeout: float = TIMEOUT) -> list[bytes]:
        return [await self.chunk(timeout) for _ in range(count)]


@contextlib.asynccontextmanager
async def raw_sse(
    server: RunningServer,
    channels: list[str],
    tok: str | None = None,
    *,
    rcvbuf: int = 0,
    headers: dict[str, str] | None = None,
) -> AsyncIterator[RawSse]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:  # small: a client that stops reading pushes back on the server quickly
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_connect(sock, ("127.0.0.1", server.port))
        query = httpx.QueryParams(sse_params(channels, tok if tok is not None else token("raw")))
        request = (
            f"GET /sse?{query} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
            "Accept: text/event-stream\r\n"
            + "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
            + "\r\n"
        )
        await loop.sock_sendall(sock, request.encode())
        stream = RawSse(sock)
        await stream.head()
        assert stream.status == 200, stream.buffer
        assert stream.headers.get(b"transfer-encoding") == b"chunked"
        assert b"content-length" not in stream.headers
        yield stream
    finally:
        sock.close()


@pytest.fixture
def raw_writes(monkeypatch: pytest.MonkeyPatch) -> SocketWrites:
    """The socket writes of every stream the gateway's protocol serves from now on:
    ``written`` counts the body chunks (each a ``transport.write`` of its own),
    ``paused`` the times a full socket stopped the writing."""
    return watch_socket_writes(monkeypatch)


def opening(channels: dict[str, str], retry_ms: int = 2000) -> bytes:
    """The first block of a fresh stream: ``retry`` and every channel at offset 0."""
    positions = {ch: StreamPosition(0, epoch) for ch, epoch in channels.items()}
    return b"retry: %d\nid: %s\n\n" % (retry_ms, cursor.encode(positions).encode())


def publication_event(positions: dict[str, StreamPosition], pub: dict[str, Any]) -> bytes:
    data = orjson.dumps(
        {
            "channel": pub["channel"],
            "offset": pub["offset"],
            "epoch": pub["epoch"],
            "data": pub["data"],
        }
    )
    return b"id: %s\ndata: %s\n\n" % (cursor.encode(positions).encode(), data)


async def publish(http: httpx.AsyncClient, channel: str, data: Any) -> dict[str, Any]:
    result = await api_publish(http, channel, data)
    return {"channel": channel, "data": data, **result}


def sessions_of(server: RunningServer, user: str) -> list[Any]:
    return [s for s in server.gateway.hub.sessions if s.user == user]


# --------------------------------------------------------------------------- the raw path is on


async def test_real_server_uses_the_gateway_protocol_and_writes_events_raw(server, raw_writes):
    assert server.server.config.http_protocol_class.cls is FrontDoor
    assert issubclass(FrontDoor, GatewayHttpToolsProtocol)
    async with api_client(server) as http, raw_sse(server, ["raw:on"]) as s:
        await s.chunk()  # the opening block goes through ASGI
        assert (raw_writes.written, raw_writes.paused) == (0, 0)
        for n in range(3):
            await publish(http, "raw:on", n)
        await s.chunks(3)
        assert (raw_writes.written, raw_writes.paused) == (3, 0)


async def test_heartbeat_comments_are_written_raw(make_server, raw_writes):
    server = await make_server(sse_heartbeat=0.05)
    async with raw_sse(server, ["raw:beat"]) as s:
        await s.chunk()
        assert await s.chunks(2) == [b": ping\n\n", b": ping\n\n"]
        assert raw_writes.written >= 2


async def test_with_raw_writes_off_the_bytes_are_the_same_and_go_through_asgi(
    make_server, raw_writes
):
    async def stream_bytes(server: RunningServer) -> list[bytes]:
        async with api_client(server) as http, raw_sse(server, ["raw:cmp"]) as s:
            first = await s.chunk()
            pubs = [await publish(http, "raw:cmp", {"n": n, "s": "é" * n}) for n in range(4)]
            # The epoch differs per server: compare with it replaced.
            epoch = pubs[0]["epoch"].encode()
            return [c.replace(epoch, b"EPOCH") for c in [first, *await s.chunks(4)]]

    raw_on = await stream_bytes(await make_server())
    assert raw_writes.written == 4
    off = await make_server(raw_writes=False)  # GATEWAY_RAW_WRITES=false
    raw_off = await stream_bytes(off)
    assert raw_writes.written == 4  # nothing more: the second server never used it
    assert raw_on == raw_off


# --------------------------------------------------------------------------- exact bytes


async def test_single_channel_events_are_byte_exact_one_chunk_each(server, raw_writes):
    payloads: list[Any] = [1, {"bid": 1.5, "u": "é\n"}, "x" * 5000, [None, True]]
    async with api_client(server) as http, raw_sse(server, ["raw:one"]) as s:
        first = await s.chunk()
        pubs = [await publish(http, "raw:one", p) for p in payloads]
        epoch = pubs[0]["epoch"]
        assert first == opening({"raw:one": epoch})
        got = await s.chunks(len(payloads))
    assert got == [
        publication_event({"raw:one": StreamPosition(p["offset"], epoch)}, p) for p in pubs
    ]
    assert [p["offset"] for p in pubs] == [1, 2, 3, 4]
    assert raw_writes.written == len(payloads)


async def test_one_publication_is_the_same_chunk_on_every_single_channel_stream(server):
    async with (
        api_client(server) as http,
        raw_sse(server, ["raw:fan"], token("a")) as a,
        raw_sse(server, ["raw:fan"], token("b")) as b,
    ):
        await a.chunk()
        await b.chunk()
        pubs = [await publish(http, "raw:fan", {"n": n}) for n in range(3)]
        got_a, got_b = await a.chunks(3), await b.chunks(3)
    assert got_a == got_b
    epoch = pubs[0]["epoch"]
    assert got_a == [
        publication_event({"raw:fan": StreamPosition(p["offset"], epoch)}, p) for p in pubs
    ]


async def test_multi_channel_events_carry_the_cursor_of_every_channel(server, raw_writes):
    channels = ["raw:a", "raw:b"]
    async with api_client(server) as http, raw_sse(server, channels) as s:
        first = await s.chunk()
        pubs = [
            await publish(http, ch, f"{ch}-{i}")
            for ch, i in [("raw:a", 1), ("raw:b", 1), ("raw:a", 2), ("raw:b", 2), ("raw:b", 3)]
        ]
        epochs = {p["channel"]: p["epoch"] for p in pubs}
        assert first == opening({ch: epochs[ch] for ch in channels})
        got = await s.chunks(len(pubs))
    positions = {ch: StreamPosition(0, epochs[ch]) for ch in channels}
    expected = []
    for p in pubs:
        positions[p["channel"]] = StreamPosition(p["offset"], p["epoch"])
        expected.append(publication_event(positions, p))
    assert got == expected
    assert raw_writes.written == len(pubs)


async def test_gap_event_is_written_raw_and_exact(server, raw_writes):
    stale = cursor.encode({"raw:gap": StreamPosition(1, "old-epoch")})
    async with api_client(server) as http, raw_sse(server, ["raw:gap"]) as live:
        await live.chunk()
        pubs = [await publish(http, "raw:gap", n) for n in range(1, 3)]
        await live.chunks(2)
        before = raw_writes.written
        # Resuming from an unknown epoch: the gap queued before the response started goes
        # out with the opening, in the response's first write (no writer, no raw write).
        async with raw_sse(server, ["raw:gap"], headers={"Last-Event-ID": stale}) as s:
            (first,) = await s.chunks(1)
    now = cursor.encode({"raw:gap": StreamPosition(2, pubs[0]["epoch"])}).encode()
    opening = b"retry: 2000\nid: %s\n\n" % now
    gap = b'event: gap\nid: %s\ndata: {"channel":"raw:gap"}\n\n' % now
    assert first == opening + gap
    assert raw_writes.written == before


async def test_a_resume_goes_out_with_the_opening_in_one_write(server, raw_writes):
    """A reconnect with ``Last-Event-ID``: the publications it missed follow the opening
    in the response's first write, on a channel the worker relays (from what it relayed)
    and on one it does not (from history); no writer task, no raw write of their own."""
    async with api_client(server) as http, raw_sse(server, ["raw:resume-live"]) as live:
        await live.chunk()
        for channel in ("raw:resume-live", "raw:resume-cold"):
            pubs = [await publish(http, channel, {"n": n}) for n in range(4)]
            if channel == "raw:resume-live":
                await live.chunks(4)
            since = {channel: StreamPosition(pubs[0]["offset"], pubs[0]["epoch"])}
            before = raw_writes.written
            headers = {"Last-Event-ID": cursor.encode(since)}
            async with raw_sse(server, [channel], headers=headers) as s:
                (first,) = await s.chunks(1)
                more = await publish(http, channel, {"n": 4})
                (after,) = await s.chunks(1)
            positions = dict(since)
            expected = b"retry: 2000\nid: %s\n\n" % cursor.encode(positions).encode()
            for p in pubs[1:]:
                positions[channel] = StreamPosition(p["offset"], p["epoch"])
                expected += publication_event(positions, p)
            assert first == expected, channel
            positions[channel] = StreamPosition(more["offset"], more["epoch"])
            assert after == publication_event(positions, more)
            # the later publication alone (to the live stream too, on its channel)
            assert raw_writes.written == before + (2 if channel == "raw:resume-live" else 1)


# --------------------------------------------------------------------------- flow control


async def _publish_many(http: httpx.AsyncClient, channel: str, count: int, pad: str) -> None:
    indices = iter(range(count))
    headers = bearer(token("backend"))

    async def worker() -> None:
        for i in indices:
            r = await http.post(
                "/api/publish",
                json={"channel": channel, "data": {"i": i, "pad": pad}},
                headers=headers,
            )
            assert r.status_code == 200, r.text

    await asyncio.gather(*(worker() for _ in range(8)))


def _events(chunks: list[bytes]) -> list[bytes]:
    """The events of a stream, each chunk holding only whole events."""
    events: list[bytes] = []
    for data in chunks:
        assert data.endswith(b"\n\n"), data[-40:]
        events += [e + b"\n\n" for e in data[:-2].split(b"\n\n")]
    return events


def _offsets(events: list[bytes]) -> list[int]:
    return [orjson.loads(e.split(b"\ndata: ", 1)[1])["offset"] for e in events if b"\ndata: " in e]


async def test_paused_socket_queues_then_batches_in_order_without_loss(make_server, raw_writes):
    count, pad = 400, "y" * 16000  # ~6.4 MB: more than the socket buffers hold
    server = await make_server(client_queue_bytes=64 * 1024 * 1024)
    async with api_client(server) as http, raw_sse(server, ["raw:burst"], rcvbuf=16384) as s:
        await s.chunk()
        await _publish_many(http, "raw:burst", count, pad)
        await eventually(lambda: raw_writes.paused > 0, timeout=TIMEOUT)
        chunks: list[bytes] = []
        while len(_offsets(_events(chunks))) < count:
            chunks.append(await s.chunk())
        [session] = sessions_of(server, "raw")
        assert session.close_reason is None
    assert _offsets(_events(chunks)) == list(range(1, count + 1))
    # What queued while the socket was full went out as batches: fewer chunks than events.
    assert len(chunks) < count
    assert raw_writes.written == len(chunks)


async def test_reader_that_stops_is_ended_as_slow_consumer_on_the_raw_path(make_server, raw_writes):
    queue_bytes = 65536
    server = await make_server(client_queue_bytes=queue_bytes)
    async with api_client(server) as http, raw_sse(server, ["raw:slow"], rcvbuf=8192) as s:
        await s.chunk()
        [session] = sessions_of(server, "raw")
        publisher = asyncio.create_task(_publish_many(http, "raw:slow", 2000, "z" * 4000))
        try:
            await eventually(lambda: not sessions_of(server, "raw"), timeout=30)
        finally:
            publisher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await publisher
        assert session.slow, session.close_reason
        assert raw_writes.written > 0 and raw_writes.paused > 0
        assert server.gateway.hub.local_subscribers("raw:slow") == 0
        # Reading again: whole chunks of whole events, an in-order prefix, then the end
        # (with the terminator if it could still be written, else the connection closes).
        chunks: list[bytes] = []
        with contextlib.suppress(EOFError):
            while chunk := await s.chunk(timeout=TIMEOUT):
                chunks.append(chunk)
        assert not s.buffer, bytes(s.buffer[:80])
    offsets = _offsets(_events(chunks))
    assert 0 < len(offsets) < 2000
    assert offsets == list(range(1, len(offsets) + 1))


# --------------------------------------------------------------------------- end of stream


async def test_drain_ends_the_stream_with_a_chunked_terminator(server, raw_writes):
    async with api_client(server) as http, raw_sse(server, ["raw:end"]) as s:
        await s.chunk()
        pubs = [await publish(http, "raw:end", n) for n in range(2)]
        got = await s.chunks(2)
        await server.gateway.drain()
        # The drain's spread reconnect delay (tests/test_drain.py), then 0\r\n\r\n: the
        # response is complete.
        last = await s.chunk()
        assert last.startswith(b"retry: ") and last.endswith(b"\n\n"), last
        assert 2000 <= int(last[7:-2]) <= 6000
        assert await s.chunk() == b""
        assert not s.buffer
        epoch = pubs[0]["epoch"]
        assert got == [
            publication_event({"raw:end": StreamPosition(p["offset"], epoch)}, p) for p in pubs
        ]
        assert raw_writes.written == 3  # the two publications and the retry
        # The connection is still a valid HTTP/1.1 keep-alive connection.
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(s.sock, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        await s.head()
        assert s.status == 200


async def test_stream_ended_by_client_removes_the_session(server):
    async with raw_sse(server, ["raw:bye"]) as s:
        await s.chunk()
        assert sessions_of(server, "raw")
    await eventually(lambda: not sessions_of(server, "raw"))


# --------------------------------------------------------------------------- RawBody itself


class _Transport:
    def __init__(self) -> None:
        self.written = bytearray()
        self.closing = False

    def write(self, data: bytes) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def _cycle(transport: _Transport, method: str = "GET") -> RequestResponseCycle:
    import logging

    return RequestResponseCycle(
        scope={"method": method, "http_version": "1.1", "headers": []},  # type: ignore[typeddict-item]
        transport=transport,  # type: ignore[arg-type]
        flow=FlowControl(transport),  # type: ignore[arg-type]
        logger=logging.getLogger("test"),
        access_logger=logging.getLogger("test"),
        access_log=False,
        default_headers=[],
        message_event=asyncio.Event(),
        expect_100_continue=False,
        keep_alive=True,
        on_response=lambda: None,
    )


def chunked(raw: RawBody) -> bool:
    """``raw.chunked``, read afresh: it changes as the cycle sends, which mypy, having
    narrowed it at an earlier assertion, would not see."""
    return raw.chunked


async def test_raw_body_refuses_until_a_chunked_response_started_then_follows_flow_control():
    transport = _Transport()
    cycle = _cycle(transport)
    raw = RawBody(cycle)
    assert raw.try_write(frame_chunk(b"early")) is False and not raw.chunked
    with pytest.raises(ConnectionError):  # waiting would never end: not a chunked response
        await raw.write(frame_chunk(b"early"))
    await cycle.send({"type": "http.response.start", "status": 200, "headers": []})
    assert chunked(raw)
    transport.written.clear()
    assert raw.try_write(frame_chunk(b"hello")) is True
    assert bytes(transport.written) == b"5\r\nhello\r\n"
    cycle.flow.pause_writing()
    assert raw.try_write(frame_chunk(b"later")) is False
    waiter = asyncio.create_task(raw.write(frame_chunk(b"later")))
    await asyncio.sleep(0)
    assert not waiter.done() and bytes(transport.written) == b"5\r\nhello\r\n"
    cycle.flow.resume_writing()
    await asyncio.wait_for(waiter, 1)
    await cycle.send({"type": "http.response.body", "body": b"", "more_body": False})
    assert bytes(transport.written).endswith(b"5\r\nlater\r\n0\r\n\r\n")
    assert not raw.chunked
    with pytest.raises(ConnectionError):
        raw.try_write(frame_chunk(b"too late"))


async def test_raw_body_refuses_a_response_with_content_length_and_a_gone_client():
    transport = _Transport()
    cycle = _cycle(transport)
    raw = RawBody(cycle)
    await cycle.send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
    )
    assert not raw.chunked and raw.try_write(frame_chunk(b"no")) is False
    head = _cycle(transport, method="HEAD")
    await head.send({"type": "http.response.start", "status": 200, "headers": []})
    assert RawBody(head).try_write(b"x") is False

    gone = _cycle(_Transport())
    await gone.send({"type": "http.response.start", "status": 200, "headers": []})
    gone.disconnected = True
    with pytest.raises(ConnectionError):
        RawBody(gone).try_write(frame_chunk(b"x"))
