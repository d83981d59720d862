"""A stream opened by the front door (``FrontDoor._stream_here``): its response's port.

Under uvicorn's protocol a stream's response is a request cycle (``DetachableCycle``)
with a ``RawBody`` port over it, made after uvicorn's per-connection state (parser,
flow control, addresses) and per-request scope. A ``GET /sse`` whose whole head came
in the connection's first read, and which the app's stream opener opens at once, needs
none of it: ``FrontStream`` is the port (``StreamPort``) of a chunked 200 the front door
wrote, with uvicorn's flow control (a write waits while the socket's buffer is full) and
the end of a response as uvicorn's cycle ends it: the last chunk, then the connection
closed or kept alive. Kept alive, it becomes uvicorn's protocol in full (its request
count and keep-alive timeout as after any response), and what the client sent
meanwhile (reading paused at the first such read, as uvicorn pauses for a pipelined
request) is handed to its parser.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string

from gateway.logs import REDACTED_ALREADY, redact
from gateway.server.forwarded import forwarded_client
from gateway.server.handover import HttpUpgrade
from gateway.server.ports import Respond, Started
from gateway.server.waiting import WriteFlow, close_transport


class Door(Protocol):
    """What the stream needs of the protocol that opened it (``FrontDoor``)."""

    transport: Any

    def stream_ended(self, pending: bytes, keep_alive: bool) -> None: ...


class StreamRequest(HttpUpgrade):
    """What a ``StreamOpener`` sees of the request (``RequestHead``): its path as uvicorn
    puts it in the scope, its query, its headers."""

    def __init__(self, path: str, query: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        # (not ``HttpUpgrade``'s: the path and query are read already)
        self._headers = headers
        self.path = path
        self.query_string = query


def log_stream(
    logger: logging.Logger,
    app: Any,
    client: tuple[str, int] | None,
    raw_path: bytes,
    query: bytes,
    headers: list[tuple[bytes, bytes]],
) -> None:
    """The access log line of a stream opened here: ``DetachableCycle.start_stream``'s,
    the client named as uvicorn's proxy headers middleware names it."""
    scope = {"client": client, "headers": headers, "raw_path": raw_path, "query_string": query}
    forwarded_client(app, scope)
    target = redact(get_path_with_query_string(scope))  # type: ignore[arg-type]
    client_addr = get_client_addr(scope)  # type: ignore[arg-type]
    line = '%s - "%s %s HTTP/%s" %d'
    logger.info(line, client_addr, "GET", target, "1.1", 200, extra={REDACTED_ALREADY: True})


async def outcome(answer: Started | Respond | None, failure: Exception | None) -> Started | Respond:
    """What an ``OpenLater``'s ``open`` gave (its answer or its exception), again: for
    uvicorn's cycle, told it once the front door read the request again."""
    if failure is not None:
        raise failure
    assert answer is not None
    return answer


class FrontStream(WriteFlow):
    """The port of a chunked response the front door started (``StreamPort``); made when
    the request is read, so that while the app opens the stream (``OpenLater``) it keeps
    what the client sends and the server's shutdown as it does once started."""

    def __init__(self, door: Door) -> None:
        self._door = door
        self._transport = door.transport
        self._on_lost: Callable[[], object] | None = None
        self.write_paused, self._writable = False, None  # (``WriteFlow``)
        self.complete = False  # the last chunk written
        self.gone = False  # the connection lost
        self.keep_alive = True  # until the server shuts down
        self.pending = b""  # what the client sent after its request

    @property
    def chunked(self) -> bool:
        """The response is still going (``RawBody.chunked``)."""
        return not (self.complete or self.gone)

    # -- from the connection -----------------------------------------------------------

    def received(self, data: bytes) -> None:
        """Bytes after the request: kept for uvicorn's parser, reading paused meanwhile."""
        self.pending += data
        self._transport.pause_reading()

    def lost(self) -> None:
        """The connection is lost: tell the owner, once; a waiting write learns it."""
        self.gone = True
        self.wake_writers()
        callback, self._on_lost = self._on_lost, None
        if callback is not None:
            callback()

    # -- the port (gateway.server.ports.StreamPort) --------------------------------------

    def on_lost(self, callback: Callable[[], object] | None) -> None:
        self._on_lost = callback
        if callback is not None and self.gone:
            callback()

    def try_write(self, chunk: bytes) -> bool:
        transport = self._transport
        if self.gone or self.complete or transport.is_closing():
            raise ConnectionError("response closed")
        if self.write_paused:
            return False
        transport.write(chunk)
        return True

    async def write(self, chunk: bytes) -> None:
        while not self.try_write(chunk):
            await self.resumed()  # also returns when the client leaves

    async def finish(self) -> None:
        """The last chunk, then the connection closed or kept alive, as uvicorn's cycle
        ends a chunked response; nothing once the client left."""
        while self.write_paused and not self.gone:
            await self.resumed()  # as uvicorn's ``send`` drains first
        if self.gone or self.complete:
            return
        self.complete = True
        self._transport.write(b"0\r\n\r\n")
        self._door.stream_ended(self.pending, self.keep_alive)
        self.pending = b""

    def abort(self) -> None:
        close_transport(self._transport)  # (a client that does not read: bounded)

    async def hold(self) -> None:
        """Nothing to wait for: the response was never an ASGI call's."""

    def release(self) -> None:
        """Nothing to release."""
