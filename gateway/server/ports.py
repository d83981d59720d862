"""What a transport needs from the server under it: one port per connection.

A port takes bytes exactly as they go on the wire (WebSocket frames, HTTP/1.1
chunks, built once per publication by ``gateway.wire``) and tells its owner what the
client sends, or that it left. Where a port comes from:

- the gateway's own uvicorn protocols (``gateway.server.websocket``,
  ``gateway.server.http``) put one in the ASGI scope's extensions: writes go straight
  to the socket, and ``hold`` returns at once, leaving the connection open after its
  ASGI call (detached);
- otherwise (``GATEWAY_RAW_WRITES=false``, another ASGI server, an HTTP/1.0 client)
  ``gateway.server.asgi`` builds one over ``receive``/``send``, and ``hold`` keeps the
  ASGI call for the connection's life.

Either way a transport has one lifecycle: set up, ``listen``/``on_lost``, write,
``await hold()``; ``release()`` once it is over.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Final, Protocol

from starlette.types import Message, Receive, Scope, Send

from gateway.server.asgi import AsgiStreamPort, AsgiWebSocketPort

logger = logging.getLogger(__name__)

# Where the gateway's protocols put a connection's port in the ASGI scope's extensions.
# (Named here so that nothing imports those protocols unless uvicorn runs them.)
RAW_FRAMES = "gateway.raw_frames"  # gateway.server.websocket
RAW_BODY = "gateway.raw_body"  # gateway.server.http: a RawBody per request
# Lifespan state: the app's answer to a WebSocket upgrade, which the gateway's protocol
# asks before running the ASGI app at all (an ``Opener``).
OPEN_WEBSOCKET = "gateway.open_websocket"
# Lifespan state: the app's answer to a plain HTTP/1.1 GET that may open a stream (a
# ``StreamOpener``), asked by the gateway's HTTP protocol before running the ASGI app.
OPEN_STREAM = "gateway.open_stream"


class Port(Protocol):
    def try_write(self, data: bytes) -> bool:
        """Write now if the socket takes it; False, with nothing written, when it cannot
        now. Raises ``ConnectionError`` once the connection is closed."""

    async def write(self, data: bytes) -> None:
        """Write, waiting for the socket as long as it takes. Raises ``ConnectionError``."""

    async def hold(self) -> None:
        """Where the ASGI call waits: at once (detached) or until ``release``."""

    def release(self) -> None:
        """The connection is over: a held ASGI call may return."""


class WebSocketPort(Port, Protocol):
    """An accepted WebSocket: text frames out, ASGI ``websocket.*`` messages in."""

    def listen(
        self, on_message: Callable[[], object], take: Callable[[Message], bool] | None = None
    ) -> None:
        """Call ``on_message`` whenever a message waits (now too, if one does). ``take``,
        where the port offers it, is given each message as it arrives while none waits
        before it, and returns whether it took it; one it did not take waits as any other
        (a port may also never call it)."""

    def pending(self) -> bool: ...

    def take(self) -> Message:
        """The next message; only while ``pending()``."""

    async def close(self, code: int, reason: str) -> None:
        """Send a close frame."""


class StreamPort(Port, Protocol):
    """A started chunked response: chunks out, the client's departure in."""

    def on_lost(self, callback: Callable[[], object] | None) -> None:
        """Call ``callback`` once the client is gone (at once if it already is)."""

    async def finish(self) -> None:
        """The last chunk: the response is complete."""

    def abort(self) -> None:
        """Close without finishing (a client that does not read)."""


class RequestHead(Protocol):
    """A request's head (a WebSocket upgrade, a GET that may open a stream), before
    anything was answered."""

    @property
    def path(self) -> str:
        """The path, percent-decoded, without the query."""

    @property
    def query_string(self) -> bytes: ...

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), None when absent."""


@dataclass(frozen=True, slots=True)
class Refuse:
    """Accept the handshake, then close with ``code``: browsers can only read a code
    after a handshake."""

    code: int
    reason: str


# Called with the connection's port once the 101 is out: the app takes the connection.
Accept = Callable[[WebSocketPort], object]


@dataclass(slots=True)
class Deferred:
    """The answer comes later (the app asks its backend first): the server reads
    nothing from the client until ``decide()`` is done, then takes or refuses the
    upgrade as if answered at once; a client that left meanwhile is forgotten. A
    server that cannot wait runs the ASGI app instead (``decide`` is never called).
    (Its field ``Final``, not frozen: made per connect the connect hook decides.)"""

    decide: Final[Callable[[], Coroutine[Any, Any, Accept | Refuse]]]


# The app's answer to an upgrade: take it (``Accept``), refuse it, decide later
# (``Deferred``), or None: not one of its fast paths, run the ASGI app as usual.
Opener = Callable[[RequestHead], Accept | Refuse | Deferred | None]


class Started(Protocol):
    """A stream the app opened: the server writes the response head (status 200, its own
    default headers, then ``headers``, chunked) and ``opening`` as the first chunk, in
    one write, then hands the response's port to ``start``."""

    headers: list[tuple[bytes, bytes]]
    opening: bytes

    def start(self, port: StreamPort) -> None: ...

    async def abandon(self) -> None:
        """The response never started (the client left first): forget the stream."""


@dataclass(frozen=True, slots=True)
class Respond:
    """A whole response to answer instead of a stream (an error found while opening)."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


@dataclass(slots=True)
class OpenLater:
    """The stream opens once ``open()`` is done (a broker call, a backend's say). (Its
    field ``Final``, not frozen: made per stream that waits, see ``StreamPosition``.)"""

    open: Final[Callable[[], Awaitable[Started | Respond]]]


# The app's answer to a GET: a stream opened now, one opening later, or None: not one of
# its fast paths, run the ASGI app as usual (which answers it, errors included).
StreamOpener = Callable[[RequestHead], Started | OpenLater | None]


_warned: set[str] = set()


def _fallback(why: str) -> None:
    if why not in _warned:
        _warned.add(why)
        logger.warning("%s: writing through ASGI instead", why)


def websocket_port(scope: Scope, receive: Receive, send: Send, *, raw: bool) -> WebSocketPort:
    """The server's own port for an accepted WebSocket, or one over ASGI."""
    if raw:
        port: WebSocketPort | None = _extension(scope, RAW_FRAMES)
        if port is not None:
            return port
        _fallback("GATEWAY_RAW_WRITES is on but the server offers no raw WebSocket port")
    return AsgiWebSocketPort(receive, send)


def stream_port(scope: Scope, receive: Receive, send: Send, *, raw: bool) -> StreamPort:
    """The server's own port for a started streaming response, or one over ASGI."""
    if raw:
        body: StreamPort | None = _extension(scope, RAW_BODY)
        if body is None:
            _fallback("GATEWAY_RAW_WRITES is on but the server offers no raw body port")
        elif not getattr(body, "chunked", False):
            logger.debug("a response that is not chunked (HTTP/1.0?): written through ASGI")
        else:
            return body
    return AsgiStreamPort(receive, send)


def _extension(scope: Scope, name: str) -> Any:
    return (scope.get("extensions") or {}).get(name)
