"""Client-side helpers for the end-to-end suites: a WebSocket client that keeps
frame order, an SSE parser, and small HTTP API wrappers.

Everything here talks to a real server over sockets, the way an outside client
would; nothing reaches into the gateway except where a test says so.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import os
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode

from tests.conftest import SECRET, RunningServer, token

TIMEOUT = 5.0

__all__ = [
    "SECRET",
    "TIMEOUT",
    "SseStream",
    "WsClient",
    "api_client",
    "api_history",
    "api_publish",
    "bearer",
    "dumps",
    "is_publication",
    "is_reply",
    "open_sse",
    "parse_sse",
    "poll",
    "sse_request",
    "token",
    "ws_client",
]


def dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def is_reply(frame: dict[str, Any]) -> bool:
    return "ok" in frame


def is_publication(frame: dict[str, Any], channel: str | None = None) -> bool:
    return (
        "ok" not in frame
        and "event" not in frame
        and "offset" in frame
        and (channel is None or frame.get("channel") == channel)
    )


def is_presence(
    frame: dict[str, Any], channel: str | None = None, event: str | None = None
) -> bool:
    return (
        "ok" not in frame
        and frame.get("event") in ("join", "leave")
        and (channel is None or frame.get("channel") == channel)
        and (event is None or frame.get("event") == event)
    )


async def poll(
    predicate: Callable[[], Awaitable[Any]], *, timeout: float = TIMEOUT, interval: float = 0.02
) -> Any:
    """Await ``predicate()`` until it is truthy or ``timeout`` passes (async ``eventually``)."""
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


# --------------------------------------------------------------------------- WebSocket


class WsClient:
    """A WebSocket client that never loses or reorders what the server sent.

    Frames read while looking for something else go to ``backlog`` and are
    returned, in order, by later ``recv``/``push`` calls.
    """

    def __init__(self, conn: ClientConnection) -> None:
        self.conn = conn
        self.backlog: deque[dict[str, Any]] = deque()
        self._ids = itertools.count(1)

    # -- raw ---------------------------------------------------------------

    async def send(self, command: Any) -> None:
        await self.conn.send(dumps(command))

    async def send_raw(self, data: str | bytes) -> None:
        await self.conn.send(data)

    async def _read(self, timeout: float) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.conn.recv(), timeout)
        assert isinstance(raw, str), f"server sent a binary frame: {raw!r}"
        frame = orjson.loads(raw)
        assert isinstance(frame, dict), f"server sent a frame that is not an object: {raw!r}"
        return frame

    async def recv(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        """The next frame, whatever it is."""
        if self.backlog:
            return self.backlog.popleft()
        return await self._read(timeout)

    # -- commands ------------------------------------------------------------

    def next_id(self) -> int:
        return next(self._ids)

    async def call(self, op: str, *, timeout: float = TIMEOUT, **fields: Any) -> dict[str, Any]:
        """Send ``op`` with a fresh id and return its reply (other frames stay queued)."""
        cmd_id = self.next_id()
        await self.send({"id": cmd_id, "op": op, **fields})
        return await self.reply(cmd_id, timeout=timeout)

    async def reply(self, cmd_id: Any, *, timeout: float = TIMEOUT) -> dict[str, Any]:
        return await self.wait_for(
            lambda f: is_reply(f) and "id" in f and f["id"] == cmd_id, timeout=timeout
        )

    async def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], *, timeout: float = TIMEOUT
    ) -> dict[str, Any]:
        """The first frame (backlog included) matching ``predicate``; others stay queued."""
        for i, frame in enumerate(self.backlog):
            if predicate(frame):
                del self.backlog[i]
                return frame
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"no matching frame within {timeout}s; backlog={list(self.backlog)[:5]}"
                )
            frame = await self._read(remaining)
            if predicate(frame):
                return frame
            self.backlog.append(frame)

    async def subscribe(
        self, channel: str, *, since: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Subscribe and return the ``result``; fails the test on an error reply."""
        fields: dict[str, Any] = {"channel": channel}
        if since is not None:
            fields["since"] = since
        reply = await self.call("subscribe", **fields)
        assert reply.get("ok") is True, reply
        result = reply["result"]
        assert isinstance(result, dict), reply
        return result

    async def publish(self, channel: str, data: Any) -> dict[str, Any]:
        reply = await self.call("publish", channel=channel, data=data)
        assert reply.get("ok") is True, reply
        result = reply["result"]
        assert isinstance(result, dict), reply
        return result

    async def publications(
        self, channel: str, count: int, *, timeout: float = TIMEOUT
    ) -> list[dict[str, Any]]:
        """The next ``count`` publication pushes of ``channel``, in arrival order."""
        deadline = time.monotonic() + timeout
        got = []
        for _ in range(count):
            got.append(
                await self.wait_for(
                    lambda f: is_publication(f, channel),
                    timeout=max(0.001, deadline - time.monotonic()),
                )
            )
        return got

    async def presence_push(
        self, channel: str, event: str, *, user: str | None = None, timeout: float = TIMEOUT
    ) -> dict[str, Any]:
        return await self.wait_for(
            lambda f: (
                is_presence(f, channel, event)
                and (user is None or f.get("client", {}).get("user") == user)
            ),
            timeout=timeout,
        )

    async def ping_ok(self) -> None:
        """The connection is open and answers commands."""
        reply = await self.call("ping")
        assert reply == {"id": reply["id"], "ok": True, "result": {}}

    async def expect_close(
        self, timeout: float = TIMEOUT
    ) -> tuple[int | None, str | None, list[Any]]:
        """Read until the server closes; return (code, reason, frames read before the close).

        ``code`` is None when the connection ended without a close frame.
        """
        frames: list[Any] = list(self.backlog)
        self.backlog.clear()
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"connection not closed within {timeout}s; got {frames[-5:]}")
            try:
                raw = await asyncio.wait_for(self.conn.recv(), remaining)
            except ConnectionClosed as exc:
                if exc.rcvd is None:
                    return None, None, frames
                return exc.rcvd.code, exc.rcvd.reason, frames
            except TimeoutError:
                continue
            frames.append(orjson.loads(raw) if isinstance(raw, str) else raw)

    async def silent(self, window: float) -> list[dict[str, Any]]:
        """Frames that arrive within ``window`` seconds (an observation window, not a sync)."""
        got = list(self.backlog)
        self.backlog.clear()
        deadline = time.monotonic() + window
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                got.append(await self._read(remaining))
            except TimeoutError:
                break
        return got


def ws_url(server: RunningServer, tok: str | None = None) -> str:
    return server.ws(tok)


@contextlib.asynccontextmanager
async def ws_client(
    server: RunningServer, tok: str | None = None, *, url: str | None = None, **kw: Any
) -> AsyncIterator[WsClient]:
    kw.setdefault("proxy", None)
    kw.setdefault("open_timeout", 5)
    kw.setdefault("close_timeout", 2)
    async with connect(url or server.ws(tok), **kw) as conn:
        yield WsClient(conn)


def small_rcvbuf_socket(port: int, size: int = 65536) -> socket.socket:
    """A connected TCP socket with a small receive buffer, so that a client that stops
    reading pushes back on the server quickly (no kernel autotuning to megabytes)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


@dataclass
class SilentServer:
    """A TCP server that accepts connections and never answers (``silent_server``)."""

    url: str
    accepted: list[asyncio.StreamWriter]


@contextlib.asynccontextmanager
async def silent_server() -> AsyncIterator[SilentServer]:
    """A server on 127.0.0.1 that accepts every connection, reads, and never writes (a
    gateway that hangs, a proxy that stopped forwarding); ``accepted`` grows with each."""
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        await reader.read()  # never answered

    listener = await asyncio.start_server(silent, "127.0.0.1", 0)
    try:
        yield SilentServer(f"http://127.0.0.1:{listener.sockets[0].getsockname()[1]}", accepted)
    finally:
        for writer in accepted:
            writer.close()
        listener.close()


class FreezingProxy:
    """A TCP proxy to a local port (``freezing_proxy``) that can go silent as a dead
    network path does: ``freeze(prefix)`` stops forwarding, both ways, on every open
    connection whose latest request began with ``prefix``, and keeps their sockets open
    (no FIN, no RST). Connections opened later are forwarded as usual."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.heads: list[bytes] = []  # the start of every request, in order
        self.frozen: set[int] = set()  # connections, by number
        self._latest: dict[int, bytes] = {}  # an open connection's latest request

    def freeze(self, prefix: bytes) -> int:
        """Freeze the open connections whose latest request began with ``prefix``; how many."""
        hits = {i for i, head in self._latest.items() if head.startswith(prefix)}
        self.frozen |= hits
        return len(hits)

    def _request(self, number: int, data: bytes) -> None:
        if data[:1].isupper():  # a request line (keep-alive: one of several)
            self.heads.append(data[:200])
            self._latest[number] = data


@contextlib.asynccontextmanager
async def freezing_proxy(port: int) -> AsyncIterator[FreezingProxy]:
    """A ``FreezingProxy`` on 127.0.0.1 to ``127.0.0.1:port``."""
    writers: list[asyncio.StreamWriter] = []
    numbers = itertools.count()

    async def pipe(
        number: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: bool
    ) -> None:
        while data := await reader.read(65536):
            if upstream:
                proxy._request(number, data)
            if number not in proxy.frozen:
                writer.write(data)
                await writer.drain()
        if number not in proxy.frozen:
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        number = next(numbers)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            writer.close()
            return
        writers.append(up_writer)
        await asyncio.gather(
            pipe(number, reader, up_writer, True),
            pipe(number, up_reader, writer, False),
            return_exceptions=True,
        )
        proxy._latest.pop(number, None)

    listener = await asyncio.start_server(handle, "127.0.0.1", 0)
    proxy = FreezingProxy(f"http://127.0.0.1:{listener.sockets[0].getsockname()[1]}")
    try:
        yield proxy
    finally:
        listener.close()
        for w in writers:
            w.close()


# --------------------------------------------------------------------------- HTTP API


def sample_value(metrics: str, sample: str) -> float:
    """The value of ``sample`` (a name with its labels, as written) on a /metrics page."""
    [value] = [
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith(sample + " ")
    ]
    return value


def bearer(tok: str | None = None) -> dict[str, str]:
    return {"Authorization": f"Bearer {tok if tok is not None else token('backend')}"}


@contextlib.asynccontextmanager
async def api_client(server: RunningServer, **kw: Any) -> AsyncIterator[httpx.AsyncClient]:
    kw.setdefault("timeout", httpx.Timeout(10.0, read=30.0))
    async with httpx.AsyncClient(base_url=server.url, trust_env=False, **kw) as client:
        yield client


async def api_publish(
    http: httpx.AsyncClient, channel: str, data: Any, tok: str | None = None
) -> dict[str, Any]:
    r = await http.post(
        "/api/publish", json={"channel": channel, "data": data}, headers=bearer(tok)
    )
    assert r.status_code == 200, (r.status_code, r.text)
    body = r.json()
    assert isinstance(body, dict)
    return body


async def api_history(
    http: httpx.AsyncClient, channel: str, tok: str | None = None, **params: Any
) -> dict[str, Any]:
    r = await http.get(f"/api/channels/{channel}/history", params=params, headers=bearer(tok))
    assert r.status_code == 200, (r.status_code, r.text)
    body = r.json()
    assert isinstance(body, dict)
    return body


# --------------------------------------------------------------------------- SSE


async def parse_sse(lines: AsyncIterator[str]) -> AsyncIterator[dict[str, Any]]:
    """Server-Sent Events from a stream of lines (line terminators already removed).

    Yields one dict per block with the fields it had (``id``, ``event``, ``data``,
    ``retry``; multi-line data joined by newlines) - blocks without ``data`` too, so
    that an ``id:`` sent with ``retry:`` is seen - and ``{"comment": text}`` for each
    comment line as it arrives.
    """
    block: dict[str, Any] = {}
    data_lines: list[str] = []
    async for line in lines:
        if line == "":
            if data_lines:
                block["data"] = "\n".join(data_lines)
            if block:
                yield block
            block, data_lines = {}, []
            continue
        if line.startswith(":"):
            text = line[1:]
            yield {"comment": text[1:] if text.startswith(" ") else text}
            continue
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            data_lines.append(value)
        elif name in ("id", "event", "retry"):
            block[name] = value
        else:
            block.setdefault("unknown", []).append(line)


_END = {"end": True}


class SseStream:
    """An open SSE response read by a background task into a queue.

    ``next`` returns items in order; ``last_id`` is the latest ``id`` among the
    items returned so far (what EventSource would send back on reconnect).
    """

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.items: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.last_id: str | None = None
        self.ended = False
        self.error: BaseException | None = None
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for item in parse_sse(self.response.aiter_lines()):
                await self.items.put(item)
        except (httpx.HTTPError, httpx.StreamError) as exc:
            self.error = exc
        finally:
            await self.items.put(_END)

    async def next(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        item = await asyncio.wait_for(self.items.get(), timeout)
        if item is _END:
            self.ended = True
            self.items.put_nowait(_END)
            raise AssertionError(f"SSE stream ended (error={self.error!r})")
        if "id" in item:
            self.last_id = item["id"]
        return item

    async def event(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        """The next block that is not a comment."""
        deadline = time.monotonic() + timeout
        while True:
            item = await self.next(max(0.001, deadline - time.monotonic()))
            if "comment" not in item:
                return item

    async def data_event(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        """The next block with data (publication, gap, join, leave), comments and
        data-less blocks skipped. ``json`` holds the decoded data."""
        deadline = time.monotonic() + timeout
        while True:
            item = await self.event(max(0.001, deadline - time.monotonic()))
            if "data" in item:
                item["json"] = orjson.loads(item["data"])
                return item

    async def publications(self, count: int, *, timeout: float = TIMEOUT) -> list[dict[str, Any]]:
        """The next ``count`` data events, which must all be publications (no ``event:``)."""
        deadline = time.monotonic() + timeout
        got = []
        for _ in range(count):
            item = await self.data_event(max(0.001, deadline - time.monotonic()))
            assert "event" not in item, f"expected a publication, got {item}"
            got.append(item)
        return got

    async def until_end(self, timeout: float) -> list[dict[str, Any]]:
        """Everything until the server ends the stream."""
        got: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError("SSE stream did not end")
            item = await asyncio.wait_for(self.items.get(), remaining)
            if item is _END:
                self.ended = True
                return got
            got.append(item)

    async def aclose(self) -> None:
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task


# Query parameters as (name, value) pairs, typed as httpx takes a list of them (the list
# is invariant, so its value type must be httpx's own, not just str).
QueryPairs = list[tuple[str, str | int | float | bool | None]]


def sse_params(
    channels: Iterable[str], tok: str | None = None, last_event_id: str | None = None
) -> QueryPairs:
    params: QueryPairs = [("channel", c) for c in channels]
    if tok is not None:
        params.append(("token", tok))
    if last_event_id is not None:
        params.append(("last_event_id", last_event_id))
    return params


@contextlib.asynccontextmanager
async def open_sse(
    http: httpx.AsyncClient,
    channels: Iterable[str],
    tok: str | None = None,
    *,
    last_event_id: str | None = None,
    headers: dict[str, str] | None = None,
    expect_status: int = 200,
    query_token: bool = True,
) -> AsyncIterator[SseStream]:
    """Open ``/sse`` for ``channels`` with the token as query parameter (a fresh default
    one when None; none at all with ``query_token=False``, e.g. to use a header)."""
    hdrs = {"Accept": "text/event-stream", **(headers or {})}
    query_tok = (token("sse-user") if tok is None else tok) if query_token else None
    params = sse_params(channels, query_tok, last_event_id)
    async with http.stream("GET", "/sse", params=params, headers=hdrs) as response:
        if response.status_code != expect_status:
            body = await response.aread() if response.status_code != 200 else b"<stream>"
            raise AssertionError(f"GET /sse: status {response.status_code}: {body!r}")
        stream = SseStream(response)
        try:
            yield stream
        finally:
            await stream.aclose()


async def sse_request(
    http: httpx.AsyncClient,
    params: QueryPairs,
    headers: dict[str, str] | None = None,
) -> tuple[int, httpx.Headers, Any]:
    """A GET /sse that is expected to fail: (status, headers, decoded JSON body).

    A 200 is returned as soon as its headers arrive (its body is never read)."""
    async with http.stream("GET", "/sse", params=params, headers=headers or {}) as response:
        if response.status_code == 200:
            return 200, response.headers, None
        raw = await response.aread()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = raw
        return response.status_code, response.headers, body


# --------------------------------------------------------------------------- raw WebSocket
# A WebSocket over a plain stream, to check the server's frames byte for byte.


async def raw_ws_handshake(
    port: int, tok: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            f"GET /ws?token={tok} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


def client_text_frame(payload: bytes) -> bytes:
    """A masked client text frame."""
    return Frame(Opcode.TEXT, payload).serialize(mask=True)


async def read_raw_frame(reader: asyncio.StreamReader) -> bytes:
    """One whole server frame, header included, exactly as it was on the wire."""
    head = await asyncio.wait_for(reader.readexactly(2), 5)
    assert head[1] & 0x80 == 0, "server frames are never masked"
    size = head[1] & 0x7F
    extra = b""
    if size == 126:
        extra = await reader.readexactly(2)
        size = int.from_bytes(extra, "big")
    elif size == 127:
        extra = await reader.readexactly(8)
        size = int.from_bytes(extra, "big")
    return head + extra + await asyncio.wait_for(reader.readexactly(size), 5)
