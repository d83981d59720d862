"""uvicorn's httptools protocol, plus a ``StreamPort`` (``gateway.server.ports``) per response.

Why: an SSE delivery through ASGI is a message dict handed through Starlette's ``send``
wrappers (ServerErrorMiddleware, CORSMiddleware, ExceptionMiddleware) and then uvicorn's
``RequestResponseCycle.send``, which frames the body as an HTTP/1.1 chunk and writes it.
The chunk of a one-channel event is the same for every subscriber (``gateway.wire``),
so the whole delivery can be one ``transport.write`` of bytes framed once.

How: every request's scope gets ``scope["extensions"][RAW_BODY]``, a ``RawBody`` bound
to that request's ``RequestResponseCycle``. It writes a chunk only while that is
exactly what uvicorn itself would write:

- only once ``http.response.start`` went out and uvicorn chose chunked transfer
  encoding (no ``content-length``, not HEAD/204/304, not an HTTP/1.0 client): until
  then ``chunked`` is False and the app keeps to ASGI;
- not while the socket's buffer is full (uvicorn's ``FlowControl``): nothing is
  written and the caller waits;
- never after the response completed or the client went away: ``ConnectionError``.

The last body message still goes through uvicorn (``finish``), which writes the
``0\\r\\n\\r\\n`` terminator and finishes the cycle (keep-alive, pipelining).

Raw writes skip every middleware's ``send`` wrapper. That is correct for ``/sse``
because nothing in front of it changes a body (CORS only adds headers to the start
message); a body-rewriting middleware (gzip, say) needs ``GATEWAY_RAW_WRITES=false``.

WebSocket upgrades: when the app's opener (``OPEN_WEBSOCKET``) takes an upgrade whose
handshake websockets would accept as it is, this protocol answers it: the request was
parsed once, here, so the 101 is written and the connection handed to the gateway's
lean WebSocket protocol (``gateway.server.upgraded``), without uvicorn's rebuilding
the request for a WebSocket protocol to parse again. Anything else (another path, a
handshake websockets would refuse or answer differently, over its header limits) takes
uvicorn's path and gets its answer.

Detached responses: ``hold`` lets the ASGI call return with the response still open
(``DetachableCycle.run_asgi``, uvicorn's copied with that one branch more; see
``COPIED_FROM_UVICORN``); the app keeps writing and ends the response later with
``finish``. An idle SSE stream then holds no task and none of the framework's frames.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from collections.abc import Callable
from typing import Any, cast
from urllib.parse import unquote

from uvicorn._types import ASGI3Application
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from websockets.http11 import MAX_LINE_LENGTH, MAX_NUM_HEADERS
from websockets.utils import accept_key

from gateway.server.ports import OPEN_WEBSOCKET, RAW_BODY, Accept, Deferred, Opener, Refuse
from gateway.server.upgraded import UpgradedWebSocket, switching_head
from gateway.server.waiting import LiteEvent

logger = logging.getLogger("uvicorn.error")

# What was copied from uvicorn and the sha256 (first 16 hex digits) of the original's
# dedented source when it was copied; tests/test_server_adapter.py compares.
COPIED_FROM_UVICORN = {
    "uvicorn.protocols.http.httptools_impl:RequestResponseCycle.run_asgi": "c3a6430de81255c9",
}


class RawBody:
    """Synchronous writes of already framed chunks to one response's socket.

    ``on_lost``'s callback is called once the connection is lost: a stream that
    writes nothing for a while still learns at once that its client left.
    """

    __slots__ = ("_cycle", "_on_lost")

    def __init__(self, cycle: RequestResponseCycle) -> None:
        self._cycle = cycle
        self._on_lost: Callable[[], object] | None = None

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

    # -- the port (gateway.server.ports.StreamPort) ------------------------------

    def on_lost(self, callback: Callable[[], object] | None) -> None:
        self._on_lost = callback
        if callback is not None and self._cycle.disconnected:
            callback()

    def lost(self) -> None:
        """The protocol's ``connection_lost``: tell the owner, once."""
        callback, self._on_lost = self._on_lost, None
        if callback is not None:
            callback()

    def try_write(self, chunk: bytes) -> bool:
        cycle = self._cycle
        if cycle.disconnected or cycle.response_complete or cycle.transport.is_closing():
            raise ConnectionError("response closed")
        if not cycle.response_started or cycle.chunked_encoding is not True:
            return False
        if cycle.flow.write_paused:
            return False
        cycle.transport.write(chunk)
        return True

    async def write(self, chunk: bytes) -> None:
        while not self.try_write(chunk):
            if not self.chunked:
                raise ConnectionError("not a started chunked response")
            await self._cycle.flow.drain()  # also returns when the client leaves

    async def finish(self) -> None:
        await self._cycle.send({"type": "http.response.body", "body": b"", "more_body": False})

    def abort(self) -> None:
        """Close the connection without finishing the response (what uvicorn does when an
        app returns from an unfinished one): the client sees the stream end."""
        self._cycle.transport.close()

    async def hold(self) -> None:
        """Detach: the ASGI call may return, the response stays open."""
        cycle = self._cycle
        if not isinstance(cycle, DetachableCycle):
            raise RuntimeError("this response cannot be detached")
        cycle.detached = True

    def release(self) -> None:
        """Nothing to do: a detached response has no ASGI call waiting."""


class DetachableCycle(RequestResponseCycle):
    """uvicorn's cycle, except that a detached response stays open when the app returns."""

    detached = False

    async def run_asgi(self, app: ASGI3Application) -> None:
        # uvicorn's (COPIED_FROM_UVICORN), except for the ``detached`` branch.
        try:
            result = await app(  # type: ignore[func-returns-value]
                self.scope, self.receive, self.send
            )
        except BaseException as exc:
            msg = "Exception in ASGI application\n"
            self.logger.error(msg, exc_info=exc)
            if not self.response_started:
                await self.send_500_response()
            else:
                self.transport.close()
        else:
            if result is not None:
                msg = "ASGI callable should return None, but returned '%s'."  # type: ignore[unreachable]
                self.logger.error(msg, result)
                self.transport.close()
            elif self.detached:
                self._forget_request()
                return  # the app finishes the response (RawBody.finish)
            elif not self.response_started and not self.disconnected:
                msg = "ASGI callable returned without starting response."
                self.logger.error(msg)
                await self.send_500_response()
            elif not self.response_complete and not self.disconnected:
                msg = "ASGI callable returned without completing response."
                self.logger.error(msg)
                self.transport.close()
        finally:
            if not self.detached:
                self.on_response = lambda: None

    def _forget_request(self) -> None:
        """Drop what only the ASGI call needed, once it returned: all of the scope (what
        the framework stored in it included) but what ``send`` still reads."""
        scope: dict[str, Any] = cast(dict[str, Any], self.scope)
        kept: dict[str, Any] = {
            key: scope[key] for key in ("type", "method", "http_version") if key in scope
        }
        scope.clear()
        scope.update(kept)


class GatewayHttpToolsProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` that offers a ``RawBody`` in each request's scope."""

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
        if raw is not None:
            raw.lost()

    # -- WebSocket upgrades answered here (see the module docstring) -------------

    def handle_websocket_upgrade(self) -> None:
        opener: Opener | None = self.app_state.get(OPEN_WEBSOCKET)
        # With the gateway's WebSocket protocol configured, the config's limits are the
        # gateway's (the 1009 limit, pings): upgrades may skip it for the lean one.
        ours = getattr(self.ws_protocol_class, "lends_upgrades", False)
        key = self._websocket_key() if opener is not None and ours else None
        decision = opener(_HttpUpgrade(self.url, self.headers)) if opener and key else None
        if decision is None:
            super().handle_websocket_upgrade()  # uvicorn: the WebSocket protocol parses it again
            return
        assert key is not None
        if isinstance(decision, Deferred):
            # The app answers later (a backend's say): read nothing meanwhile.
            self.transport.pause_reading()
            task = asyncio.ensure_future(decision.decide())
            task.add_done_callback(lambda done: self._decided(key, self.url, done))
            return
        self._switch(key, self.url, decision)

    def _decided(self, key: str, url: bytes, task: asyncio.Future[Accept | Refuse]) -> None:
        """A deferred decision is in: switch, unless the client left (or the server
        closed the connection, stopping) meanwhile."""
        if task.cancelled() or self.transport.is_closing():
            return
        error = task.exception()
        if error is not None:
            logger.error("deciding a WebSocket upgrade failed", exc_info=error)
            self.transport.close()
            return
        self.transport.resume_reading()
        self._switch(key, url, task.result())

    def _switch(self, key: str, url: bytes, decision: Accept | Refuse) -> None:
        """Write the 101 and hand the connection to the gateway's WebSocket protocol."""
        config = self.config
        protocol = UpgradedWebSocket(
            connections=self.connections,
            max_size=config.ws_max_size,
            ping_interval=config.ws_ping_interval,
            ping_timeout=config.ws_ping_timeout,
            client=self.client,
            access_log=config.access_log,
        )
        self.connections.discard(self)
        self.transport.set_protocol(protocol)
        protocol.connection_made(self.transport)
        protocol.open(switching_head(accept_key(key), self.server_state.default_headers), url)
        self.url, self.headers = b"", []
        if isinstance(decision, Refuse):
            protocol.refuse(decision.code, decision.reason)
        else:
            decision(protocol)

    def _websocket_key(self) -> str | None:
        """The ``Sec-WebSocket-Key`` of a handshake that websockets would accept as it is;
        None for anything else, which then takes uvicorn's path and gets its answer."""
        if self.scope.get("method") != "GET" or self.parser.get_http_version() != "1.1":
            return None
        # websockets' own limits on the request it parses (431 / 414 when over)
        if len(self.headers) > MAX_NUM_HEADERS or len(self.url) + 16 > MAX_LINE_LENGTH:
            return None
        keys, versions, upgrades = [], [], []
        for name, value in self.headers:
            if len(name) + len(value) + 4 > MAX_LINE_LENGTH:
                return None
            if name == b"sec-websocket-key":
                keys.append(value)
            elif name == b"sec-websocket-version":
                versions.append(value)
            elif name == b"upgrade":
                upgrades.append(value.lower())
        if len(keys) != 1 or versions != [b"13"] or upgrades != [b"websocket"]:
            return None
        try:
            if len(base64.b64decode(keys[0], validate=True)) != 16:
                return None
        except (binascii.Error, ValueError):
            return None
        return keys[0].decode("ascii")


class _HttpUpgrade:
    """What an ``Opener`` sees of an upgrade parsed by the HTTP protocol (``Upgrade``)."""

    __slots__ = ("_headers", "_url")

    def __init__(self, url: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        self._url = url
        self._headers = headers

    @property
    def path(self) -> str:
        return unquote(self._url.partition(b"?")[0].decode("latin-1"))

    @property
    def query_string(self) -> bytes:
        return self._url.partition(b"?")[2]

    def header(self, name: str) -> str | None:
        wanted = name.lower().encode("latin-1")
        for key, value in self._headers:
            if key == wanted:
                return value.decode("latin-1")
        return None
