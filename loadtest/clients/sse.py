"""SSE subscriber: a raw HTTP/1.1 GET on an ``asyncio.Protocol``, the response parsed by
httptools.

Deliberately not an HTTP client library: a stream costs one socket and a few buffers,
and each event costs a split and an ``orjson.loads``. The response's framing (a chunked
body, or one that ends with the connection, as Nchan's) is decoded in C by httptools'
parser, as a browser decodes it: decoding chunks in Python cost this client about 1 µs
an event more on a chunked stream, a delay of its own inside the latency it measures
(docs/benchmarks.md). Lines may end in LF or CRLF (sse-starlette uses CRLF); ``id:``
lines and ``:`` comments (heartbeats) are skipped.
"""

from __future__ import annotations

import asyncio
import time

import httptools

from loadtest.clients.net import open_socket
from loadtest.clients.slow import ReadThrottle
from loadtest.clients.stamped import StampedTransport
from loadtest.dialects import READY, Failed, SseDialect
from loadtest.recorder import ConnState, Recorder


class SseClient(asyncio.Protocol):
    def __init__(
        self,
        dialect: SseDialect,
        conn: ConnState,
        recorder: Recorder,
        ready: asyncio.Future[None],
        request: bytes,
        slow_interval: float | None,
    ) -> None:
        self.dialect = dialect
        self.conn = conn
        self.recorder = recorder
        self.ready = ready
        self.request = request
        self.slow_interval = slow_interval
        self.throttle: ReadThrottle | None = None
        self.transport: asyncio.Transport | None = None
        self.stamps: StampedTransport | None = None  # the kernel's receive times
        self.closing = False
        self.failed = False
        self.parser = httptools.HttpResponseParser(self)
        self.events = b""
        self.disconnected: asyncio.Future[None] = ready.get_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: no isinstance check.
        self.transport = transport  # type: ignore[assignment]
        if isinstance(transport, StampedTransport):
            self.stamps = transport
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(f"bad response: {exc}")

    # -- httptools' callbacks ----------------------------------------------------------

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status != 200:
            self._fail(f"HTTP {status}")
        elif self.dialect.ready_on_open:
            self._on_ready()

    def on_body(self, body: bytes) -> None:
        if not self.failed:
            self._feed(body)

    def on_message_complete(self) -> None:
        self._end_of_stream()  # the server ended the stream

    # -- events ----------------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        buf = self.events + data if self.events else data
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n")
        events = buf.split(b"\n\n")
        self.events = events.pop()
        for raw in events:
            self._event(raw)

    def _event(self, raw: bytes) -> None:
        event: bytes | None = None
        data: bytes | None = None
        retry = False
        for line in raw.split(b"\n"):
            if line.startswith(b"data:"):
                value = line[6:] if line[5:6] == b" " else line[5:]
                data = value if data is None else data + b"\n" + value
            elif line.startswith(b"event:"):
                event = line[6:].strip()
            elif line.startswith(b"retry:"):
                retry = True
        if data is None and event is None and not retry:
            return
        now = time.time()
        try:
            parsed = self.dialect.parse(event, data, retry)
        except Exception:
            self.recorder.foreign += 1
            return
        if type(parsed) is dict:
            stamps = self.stamps
            self.recorder.on_payload(
                self.conn, parsed, now, stamps.arrived if stamps is not None else None
            )
            if self.throttle is not None:
                self.throttle.on_data()
        elif parsed is READY:
            self._on_ready()
        elif isinstance(parsed, Failed):
            self._fail(parsed.reason)

    def _on_ready(self) -> None:
        if not self.ready.done():
            self.recorder.on_ready(self.conn)
            self.ready.set_result(None)
            if self.slow_interval and self.transport is not None:
                self.throttle = ReadThrottle(self.transport, self.slow_interval)

    def _end_of_stream(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _fail(self, reason: str) -> None:
        self.failed = True
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(reason))
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.throttle is not None:
            self.throttle.cancel()
        self.recorder.on_closed(self.conn, None, expected=self.closing)
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("closed eof"))
        if not self.disconnected.done():
            self.disconnected.set_result(None)

    def unthrottle(self) -> None:
        """A slow consumer starts reading at full speed (to see how the server closed it)."""
        if self.throttle is not None:
            self.throttle.cancel()
            self.throttle = None
            if self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()

    def close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()


async def connect_sse(
    dialect: SseDialect,
    host: str,
    port: int,
    token: str,
    conn: ConnState,
    recorder: Recorder,
    *,
    local_ip: str | None = None,
    rcvbuf: int | None = None,
    slow_interval: float | None = None,
    timeout: float = 10.0,
    stamped: bool = False,
) -> SseClient:
    """Open the stream and wait until the dialect says the subscription is live;
    ``stamped``: read the socket with the kernel's receive times (``StampedTransport``)."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    ready.add_done_callback(_retrieve)
    request = (
        f"GET {dialect.path(conn.channel, token)} HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n"
    ).encode()
    sock = await asyncio.wait_for(
        open_socket(host, port, local_ip=local_ip, rcvbuf=rcvbuf, stamped=stamped), timeout
    )
    try:
        client = SseClient(dialect, conn, recorder, ready, request, slow_interval)
        if stamped:
            StampedTransport(loop, sock, client)
        else:
            await loop.create_connection(lambda: client, sock=sock)
    except BaseException:
        sock.close()
        raise
    try:
        await asyncio.wait_for(asyncio.shield(ready), timeout)
    except BaseException:
        client.close()
        raise
    return client


def _retrieve(future: asyncio.Future[None]) -> None:
    """Mark a failed readiness as seen: a timeout may have stopped waiting for it."""
    if not future.cancelled():
        future.exception()
