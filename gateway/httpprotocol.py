"""uvicorn's httptools protocol, plus raw body writes for the SSE hot path.

Why it exists: an SSE delivery through ASGI is a message dict handed through three
Starlette ``send`` wrappers (ServerErrorMiddleware, CORSMiddleware, ExceptionMiddleware)
and then uvicorn's ``RequestResponseCycle.send``, which frames the body as an HTTP/1.1
chunk and writes it. py-spy put most of the fan-out CPU time there. The bytes of a
one-channel event are the same for every subscriber (``Publication.sse_chunk``), so the
whole delivery can be one ``transport.write`` of bytes framed once per publication.

How: every request's scope gets ``scope["extensions"][RAW_BODY]``, a ``RawBody`` bound to
that request's ``RequestResponseCycle``. Under any other server (the TestClient, h11) the
key is absent and the app uses ASGI ``send``. ``RawBody.write`` takes an already framed
chunk (``frame_chunk``) and writes it only while that is exactly what uvicorn itself
would write:

- not before ``http.response.start`` went out, and only if uvicorn chose chunked
  transfer encoding for the response (no ``content-length``, not HEAD/204/304): until
  then ``chunked`` is False and the caller keeps using ASGI ``send``;
- not while the socket's buffer is full (uvicorn's ``FlowControl.write_paused``): the
  write is refused, nothing is written, and the caller awaits ``drain()`` first;
- never after the response completed or the client went away: ``ConnectionError``, as
  a closed socket would.

The last body message (``more_body: False``) must still go through ASGI ``send``, so
that uvicorn writes the ``0\\r\\n\\r\\n`` terminator and finishes the cycle (keep-alive,
access state, pipelining).

Raw writes skip every middleware's ``send`` wrapper. That is correct for ``/sse`` because
nothing in front of it changes a body (CORS only adds headers to the start message); a
body-rewriting middleware (gzip, say) would have to keep those responses on ASGI.
``GATEWAY_RAW_WRITES=false`` keeps every stream on ASGI ``send`` (for comparisons, or
behind such a middleware).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from channels.lite import LiteEvent

RAW_BODY = "gateway.raw_body"


def frame_chunk(data: bytes) -> bytes:
    """``data`` as one HTTP/1.1 chunk: hex size line, the bytes, CRLF.

    Empty data gives no bytes at all: a zero-size chunk would end the response.
    """
    return b"%x\r\n%s\r\n" % (len(data), data) if data else b""


class RawBody:
    """Synchronous writes of already framed chunks to one response's socket.

    ``on_lost``, when set, is called once the connection is lost: a stream that
    writes nothing for a while still learns at once that its client left.
    """

    __slots__ = ("_cycle", "on_lost")

    def __init__(self, cycle: RequestResponseCycle) -> None:
        self._cycle = cycle
        self.on_lost: Callable[[], object] | None = None

    @property
    def chunked(self) -> bool:
        """The response started with chunked encoding and is still going."""
        cycle = self._cycle
        return (
            cycle.response_started
            and cycle.chunked_encoding is True
            and not cycle.response_complete
            and not cycle.disconnected
        )

    def write(self, chunk: bytes) -> bool:
        """Write ``chunk`` (from ``frame_chunk``) now; True when written.

        False, with nothing written, when it cannot be written now: before a chunked
        response started (use ASGI ``send``) or while the socket's buffer is full
        (``await drain()``, then try again). Raises ``ConnectionError`` once the response
        is complete or the client is gone.
        """
        cycle = self._cycle
        if cycle.disconnected or cycle.response_complete or cycle.transport.is_closing():
            raise ConnectionError("response closed")
        if not cycle.response_started or cycle.chunked_encoding is not True:
            return False
        if cycle.flow.write_paused:
            return False
        cycle.transport.write(chunk)
        return True

    async def drain(self) -> None:
        """Wait until the socket takes writes again (also returns when the client leaves)."""
        await self._cycle.flow.drain()


class GatewayHttpToolsProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` that offers ``RawBody`` in each request's scope."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # Less memory per idle stream: an Event without an empty waiter deque.
        writable = LiteEvent()
        writable.set()
        self.flow._is_writable_event = writable  # type: ignore[assignment]

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        cycle = self.cycle
        # No new cycle for a WebSocket upgrade: the scope then belongs to the ws protocol.
        if cycle is not None and cycle.scope is self.scope:
            cycle.message_event = LiteEvent()  # type: ignore[assignment]  # nobody waits yet
            scope = cast(dict[str, Any], self.scope)
            self.raw_body = scope.setdefault("extensions", {})[RAW_BODY] = RawBody(cycle)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        raw: RawBody | None = getattr(self, "raw_body", None)
        if raw is not None and raw.on_lost is not None:
            raw.on_lost()
