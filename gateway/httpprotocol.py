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

Detached responses: once a chunked response has started, ``RawBody.detach`` lets the
ASGI call return with the response still open (``DetachableCycle.run_asgi`` neither
reports it unfinished nor closes the socket); the app keeps writing raw chunks and ends
the response later with ``RawBody.finish``. An idle SSE stream then holds no task and
none of the framework's coroutine frames.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast

from uvicorn._types import ASGI3Application
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

    def detach(self) -> None:
        """Keep the response open after the ASGI call returns (see the module docstring)."""
        cycle = self._cycle
        if not isinstance(cycle, DetachableCycle):
            raise RuntimeError("this response cannot be detached")
        cycle.detached = True

    async def finish(self) -> None:
        """End a (detached) response: the last chunk, and uvicorn's keep-alive handling."""
        await self._cycle.send({"type": "http.response.body", "body": b"", "more_body": False})

    def abort(self) -> None:
        """Close the connection without finishing the response (what uvicorn does when an
        app returns from an unfinished one): the client sees the stream end."""
        self._cycle.transport.close()


class DetachableCycle(RequestResponseCycle):
    """uvicorn's cycle, except that a detached response stays open when the app returns."""

    detached = False

    async def run_asgi(self, app: ASGI3Application) -> None:
        try:
            await app(self.scope, self.receive, self.send)
        except BaseException as exc:
            self.logger.error("Exception in ASGI application\n", exc_info=exc)
            if not self.response_started:
                await self.send_500_response()
            else:
                self.transport.close()
        else:
            if self.detached:
                self._forget_request()
                return  # the app finishes the response (RawBody.finish)
            elif not self.response_started and not self.disconnected:
                self.logger.error("ASGI callable returned without starting response.")
                await self.send_500_response()
            elif not self.response_complete and not self.disconnected:
                self.logger.error("ASGI callable returned without completing response.")
                self.transport.close()
        self.on_response = lambda: None

    def _forget_request(self) -> None:
        """Drop what only the ASGI call needed, once it returned: all of the scope (what
        the framework stored in it included) but the method, which ``send`` reads."""
        scope: dict[str, Any] = cast(dict[str, Any], self.scope)
        kept: dict[str, Any] = {
            key: scope[key] for key in ("type", "method", "http_version") if key in scope
        }
        scope.clear()
        scope.update(kept)


class GatewayHttpToolsProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` that offers ``RawBody`` in each request's scope."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # Less memory per idle stream: an Event without an empty waiter deque.
        writable = LiteEvent()
        writable.set()
        self.flow._is_writable_event = writable  # type: ignore[assignment]

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        # uvicorn builds the cycle inline in on_headers_complete; make it detachable
        # (same attributes, one method more) before its task starts.
        cycle.__class__ = DetachableCycle
        super()._start_asgi_task(cycle, app)

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        cycle = self.cycle
        # No new cycle for a WebSocket upgrade: the scope then belongs to the ws protocol.
        if cycle is not None and cycle.scope is self.scope:
            cycle.message_event = LiteEvent()  # type: ignore[assignment]  # nobody waits yet
            scope = cast(dict[str, Any], self.scope)
            self.raw_body = scope.setdefault("extensions", {})[RAW_BODY] = RawBody(cycle)
            # Parsed into the scope, which the app owns from here (and which a detached
            # response trims): a long stream keeps neither, nor the token in the URL.
            self.url = b""
            self.headers = []

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        raw: RawBody | None = getattr(self, "raw_body", None)
        if raw is not None and raw.on_lost is not None:
            raw.on_lost()
