"""SSE subscriber: a raw HTTP/1.1 GET on an ``asyncio.Protocol``, chunked body decoded inline.

Deliberately not an HTTP client library: a stream costs one socket and a few buffers,
and each event costs a split and an ``orjson.loads``. Lines may end in LF or CRLF
(sse-starlette uses CRLF); ``id:`` lines and ``:`` comments (heartbeats) are skipped.
"""

from __future__ import annotations

import asyncio
import time

from loadtest.clients.net import open_socket
from loadtest.clients.slow import ReadThrottle
from loadtest.dialects import READY, Failed, SseDialect
from loadtest.recorder import ConnState, Recorder

MAX_HEADER = 65536


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
        self.closing = False
        self.head = b""
        self.in_body = False
        self.chunked = False
        self.chunk_left = 0
        self.skip_crlf = 0
        self.chunk_buf = b""
        self.events = b""
        self.disconnected: asyncio.Future[None] = ready.get_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: no isinstance check.
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if not self.in_body:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                if len(self.head) > MAX_HEADER:
                    self._fail("response header too large")
                return
            head, data = self.head[:end], self.head[end + 4 :]
            self.head = b""
            self.in_body = True
            status_line, _, headers = head.partition(b"\r\n")
            parts = status_line.split(b" ", 2)
            if len(parts) < 2 or parts[1] != b"200":
                self._fail(f"HTTP {parts[1].decode() if len(parts) > 1 else '?'}")
                return
            self.chunked = b"transfer-encoding: chunked" in headers.lower()
            if self.dialect.ready_on_open:
                self._on_ready()
            if not data:
                return
        if self.chunked:
            data = self._dechunk(data)
        if data:
            self._feed(data)

    def _dechunk(self, data: bytes) -> bytes:
        if self.chunk_left or self.skip_crlf or self.chunk_buf:
            return self._dechunk_any(data)
        # Whole chunks, the usual read: one find, two slices and an int each (a client
        # that decodes slower than the server frames would add its own delay to the
        # latency it measures; Nchan's streams are not chunked at all).
        out: list[bytes] = []
        pos, n = 0, len(data)
        find = data.find
        while pos < n:
            end = find(b"\r\n", pos)
            if end < 0:
                break
            line = data[pos:end]
            size = int(line.split(b";", 1)[0] if b";" in line else line, 16)
            start = end + 2
            stop = start + size
            if size == 0 or stop + 2 > n:
                break
            out.append(data[start:stop])
            pos = stop + 2
        if pos < n:
            out.append(self._dechunk_any(data[pos:]))
        return out[0] if len(out) == 1 else b"".join(out)

    def _dechunk_any(self, data: bytes) -> bytes:
        buf = self.chunk_buf + data if self.chunk_buf else data
        out: list[bytes] = []
        pos, n = 0, len(buf)
        while pos < n:
            if self.chunk_left:
                take = min(self.chunk_left, n - pos)
                out.append(buf[pos : pos + take])
                pos += take
                self.chunk_left -= take
                if not self.chunk_left:
                    self.skip_crlf = 2
            elif self.skip_crlf:
                take = min(self.skip_crlf, n - pos)
                pos += take
                self.skip_crlf -= take
            else:
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    break
                size = int(buf[pos:end].split(b";", 1)[0], 16)
                pos = end + 2
                if size == 0:  # the server ended the stream
                    self._end_of_stream()
                    pos = n
                    break
                self.chunk_left = size
        self.chunk_buf = buf[pos:]
        return b"".join(out)

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
            self.recorder.on_payload(self.conn, parsed, now)
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
) -> SseClient:
    """Open the stream and wait until the dialect says the subscription is live."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    ready.add_done_callback(_retrieve)
    request = (
        f"GET {dialect.path(conn.channel, token)} HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n"
    ).encode()
    sock = await asyncio.wait_for(
        open_socket(host, port, local_ip=local_ip, rcvbuf=rcvbuf), timeout
    )
    try:
        _, client = await loop.create_connection(
            lambda: SseClient(dialect, conn, recorder, ready, request, slow_interval), sock=sock
        )
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
