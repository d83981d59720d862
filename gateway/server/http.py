"""uvicorn's httptools protocol, plus a ``StreamPort`` (``gateway.server.ports``) per response.

Why: an SSE delivery through ASGI is a message dict handed through Starlette's ``send``
wrappers (ServerErrorMiddleware, CORSMiddleware, ExceptionMiddleware) and then uvicorn's
``RequestResponseCycle.send``, which frames the body as an HTTP/1.1 chunk and writes it.
The chunk of a one-channel event is the same for every subscriber (``gateway.wire``),
so the whole delivery can be one ``transport.write`` of bytes framed once.

How: every request's scope gets ``scope["extensions"][RAW_BODY]``, a ``RawBody`` bound
to that request's ``RequestResponseCycle`` (``gateway.server.cycle``). It writes a chunk
only while that is exactly what uvicorn itself would write:

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

WebSocket upgrades the app's opener takes are answered here too
(``gateway.server.answers``, the base class).

Streams opened below ASGI: before a request's ASGI task starts, the app's stream opener
(``OPEN_STREAM``) may take a plain HTTP/1.1 GET (the gateway's ``/sse``). It answers at
once with a ``Started`` stream (the head, uvicorn's default headers and the app's, and
the first chunk go out in one write: ``DetachableCycle.start_stream`` writes them as
uvicorn's ``send`` would, access log line included), or later (``OpenLater``: a stream
or the app's error response, written through ``send``). No task, middleware or
framework runs for it; like the WebSocket opener, this bypasses any ASGI middleware
wrapped around the gateway's app. uvicorn's proxy headers middleware is honoured for
the client address of the log line (``gateway.server.forwarded``).

Detached responses: ``hold`` lets the ASGI call return with the response still open
(``DetachableCycle.run_asgi``, uvicorn's copied with that one branch more; see
``COPIED_FROM_UVICORN``); the app keeps writing and ends the response later with
``finish``. An idle SSE stream then holds no task and none of the framework's frames.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any, Literal
from urllib.parse import unquote

import httptools
from uvicorn._types import ASGI3Application, HTTPScope
from uvicorn.config import Config
from uvicorn.logging import TRACE_LOG_LEVEL
from uvicorn.protocols.http.flow_control import FlowControl, service_unavailable
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    RequestResponseCycle,
)
from uvicorn.protocols.utils import is_ssl
from uvicorn.server import ServerState

from gateway.server.addresses import address, peer
from gateway.server.answers import AnswersUpgrades
from gateway.server.cycle import DetachableCycle, RawBody, log_failure
from gateway.server.forwarded import forwarded_client
from gateway.server.headwait import HEAD_DEADLINES, HeadDeadlines
from gateway.server.perserver import server_class
from gateway.server.ports import (
    OPEN_STREAM,
    RAW_BODY,
    OpenLater,
    Started,
    StreamOpener,
)
from gateway.server.target import request_target
from gateway.server.waiting import LiteEvent

logger = logging.getLogger("uvicorn.error")

# What a request head may take, its target and headers (the front door reads the first
# ``FRONT_LIMIT`` of an upgrade or stream itself): 64 KiB, past Node's 16 and nginx's 32.
MAX_HEAD = 65_536
LINGER = 10.0  # seconds a refused client may go on sending before it is closed

# What was copied from uvicorn and the sha256 (first 16 hex digits) of the original's
# dedented source when it was copied; tests/test_server_adapter.py compares.
COPIED_FROM_UVICORN = {
    "uvicorn.protocols.http.httptools_impl:HttpToolsProtocol.__init__": "264f2f06759670d4",
    "uvicorn.protocols.http.httptools_impl:HttpToolsProtocol.connection_made": "ba1915817ccf6c1b",
    "uvicorn.protocols.http.httptools_impl:HttpToolsProtocol.on_headers_complete": (
        "7e259152e5aade71"
    ),
    "uvicorn.protocols.http.flow_control:FlowControl.__init__": "56685b6831683d3d",
    # the client it puts in the scope (``forwarded_client``)
    "uvicorn.middleware.proxy_headers:ProxyHeadersMiddleware.__call__": "85cff06f8cb98a0c",
}


class GatewayHttpToolsProtocol(AnswersUpgrades):
    """``HttpToolsProtocol`` that offers a ``RawBody`` in each request's scope."""

    raw_body: RawBody | None = None  # the current request's
    # uvicorn's per-connection and per-request state until the connection sets it: read
    # from the class, not set on each new protocol (``__init__``)
    transport: asyncio.Transport = None  # type: ignore[assignment]
    flow: FlowControl = None  # type: ignore[assignment]
    server: tuple[str, int | None] | None = None
    client: tuple[str, int] | None = None
    scheme: Literal["http", "https"] | None = None
    scope: HTTPScope = None  # type: ignore[assignment]
    headers: list[tuple[bytes, bytes]] = None  # type: ignore[assignment]
    expect_100_continue = False
    cycle: RequestResponseCycle = None  # type: ignore[assignment]
    timeout_keep_alive_task: asyncio.TimerHandle | None = None
    upgrade_answer: bool | None = None  # ``_should_upgrade``'s, for the current request
    # Bytes read while a request head is awaited (``MAX_HEAD``; from its first byte on).
    reading_head = True
    head_read = 0
    head_refused = False  # answered 431: what the client still sends is dropped
    # The app's stream opener's answer for the request being read, when the front door
    # asked it already (``FrontDoor._stream_here``).
    stream_asked = False
    stream_answer: Started | OpenLater | None = None
    parses_at_once = True  # ``_parsing`` at once (the front door: when its read needs it)

    def __new__(
        cls,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> Any:
        return object.__new__(server_class(cls, config, server_state, app_state))

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        # uvicorn's (COPIED_FROM_UVICORN): what it computes the same for every connection
        # of a server (the config's settings, its loggers, the server's sets) is computed
        # once, as attributes of this class's subclass for the server (``__new__``); the
        # per-connection state above comes from the class too. A new protocol object is
        # most of what a connection costs before its request, and a stream keeps its own.
        if self.parses_at_once:
            self._parsing(_loop)
        elif _loop is not None:
            self.loop = _loop

    def _parsing(self, _loop: asyncio.AbstractEventLoop | None = None) -> None:
        """The rest of uvicorn's ``__init__``: what a connection needs to parse requests."""
        self.loop = _loop or asyncio.get_event_loop()
        self.access_log = self.access_logger.hasHandlers()
        self.parser = httptools.HttpRequestParser(self)
        if _LENIENCIES:  # (uvicorn's ``contextlib.suppress``: three calls a connection)
            self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
        self.pipeline = deque()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        # uvicorn's (COPIED_FROM_UVICORN), but the addresses come from the transport's
        # sockname and peername: uvicorn asks for its "socket", for which uvloop builds a
        # socket object per connection (and detaches it at close), a fifteenth of an SSE
        # connect's CPU.
        self.connections.add(self)
        self.transport = transport
        self._connected(transport)
        self.head_deadlines: HeadDeadlines | None = self.app_state.get(HEAD_DEADLINES)
        if self.head_deadlines is not None:
            self.head_deadlines.start(self)

    def _connected(self, transport: asyncio.Transport) -> None:
        """The rest of uvicorn's ``connection_made``: what responses need."""
        self.flow = _flow_control(transport)
        self.server = address(transport.get_extra_info("sockname"), local=True)
        self.client = peer(transport.get_extra_info("peername"))
        self.scheme = "https" if is_ssl(transport) else "http"
        if self.logger.level <= TRACE_LOG_LEVEL:
            prefix = f"{self.client[0]}:{self.client[1]} - " if self.client else ""
            self.logger.log(TRACE_LOG_LEVEL, "%sHTTP connection made", prefix)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.upgrade_answer = None
        self.reading_head = True  # (its bytes counted from the read it began in)
        if self.head_deadlines is not None:  # a request after a response: its own wait
            self.head_deadlines.start(self)

    def _should_upgrade(self) -> bool:
        # uvicorn asks once its headers are in, again at the message's end and once more
        # when the parser stops for the upgrade, each time reading the headers anew: the
        # same answer for the same request, so kept for the request.
        answer = self.upgrade_answer
        if answer is None:
            answer = self.upgrade_answer = super()._should_upgrade()
        return answer

    def head_timed_out(self) -> None:
        """No whole request head in time (``gateway.server.headwait``): a 408, written as
        uvicorn writes its 400 for a request it cannot parse, and the connection closed."""
        self._refuse_head(408, b"Request Timeout")

    def head_too_large(self) -> None:
        """More than ``MAX_HEAD`` bytes read and no whole request head: a 431 and the
        connection closed (httptools sets no limit; each header would be kept whole)."""
        self._refuse_head(431, b"Request Header Fields Too Large", linger=True)

    def _refuse_head(self, status: int, message: bytes, linger: bool = False) -> None:
        """The answer, then the connection closed; ``linger``: a client likely still
        sending, whose bytes closing now would answer with a reset (destroying the
        answer on its way): our end (FIN), its bytes dropped until it closes, 10 s at
        most."""
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            self.transport.close()  # a request pipelined behind a response still going
            return
        content = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            content += [name, b": ", value, b"\r\n"]
        content += [
            b"content-type: text/plain; charset=utf-8\r\n",
            b"content-length: %d\r\n" % len(message),
            b"connection: close\r\n\r\n",
            message,
        ]
        self.transport.write(b"".join(content))
        if linger and self.transport.can_write_eof():
            self.head_refused = True
            self.transport.write_eof()
            self.loop.call_later(LINGER, self.transport.close)
        else:
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        # Not into a response already going (a stream, read with this in one read): closed.
        cycle = self.cycle
        if cycle is not None and cycle.response_started and not cycle.response_complete:
            self.transport.close()
            return
        super().send_400_response(msg)

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        # uvicorn builds the cycle inline in on_headers_complete (or takes a pipelined
        # one); make it detachable (same attributes, a few methods more), give it its
        # port, and let the app's stream opener answer it before any task does.
        # (No ``typing.cast`` on this path: it is a call, at every request.)
        cycle.__class__ = DetachableCycle
        scope: dict[str, Any] = cycle.scope  # type: ignore[assignment]
        self.raw_body = scope.setdefault("extensions", {})[RAW_BODY] = RawBody(cycle)
        if app is self.app and self._open_stream(cycle):  # type: ignore[arg-type]
            return
        super()._start_asgi_task(cycle, app)

    def _open_stream(self, cycle: DetachableCycle) -> bool:
        """Whether the app's ``StreamOpener`` took the request (see the module docstring)."""
        opener: StreamOpener | None = self.app_state.get(OPEN_STREAM)
        scope: dict[str, Any] = cycle.scope  # type: ignore[assignment]
        answer = self.stream_answer
        if self.stream_asked:  # by the front door (``FrontDoor._stream_here``)
            self.stream_asked, self.stream_answer = False, None
        elif opener is None or scope["method"] != "GET" or scope["http_version"] != "1.1":
            return False
        else:
            answer = opener(_ScopeHead(scope))
        if answer is None:
            return False
        if self.access_log and self.access_logger.isEnabledFor(logging.INFO):
            forwarded_client(self.app, scope)  # the client of the log line, as uvicorn's
        if isinstance(answer, OpenLater):
            task = self.loop.create_task(cycle.open_later(answer))
            task.add_done_callback(self.tasks.discard)
            task.add_done_callback(log_failure)
            self.tasks.add(task)
        else:
            cycle.start_stream(answer)
        return True

    def on_headers_complete(self) -> None:
        # uvicorn's (COPIED_FROM_UVICORN), but its target split by ``request_target``
        # (not httptools' URL parser, for plain targets), the cycle's message event a
        # ``LiteEvent`` from the start (nobody waits on it yet; uvicorn makes an
        # ``asyncio.Event``), and the URL and headers dropped once parsed into the
        # scope, which the app owns from here (and which a detached response trims): a
        # long stream keeps neither, nor the token in the URL.
        if self.head_deadlines is not None:
            self.head_deadlines.done(self)
        self.reading_head, self.head_read = False, 0
        parser, scope = self.parser, self.scope
        http_version = parser.get_http_version()
        scope["method"] = parser.get_method().decode("ascii")
        if http_version != "1.1":
            scope["http_version"] = http_version
        if parser.should_upgrade() and self._should_upgrade():
            return
        raw_path, scope["query_string"] = request_target(self.url)
        path = raw_path.decode("ascii")
        if "%" in path:
            path = unquote(path)
        scope["path"] = self.root_path + path
        scope["raw_path"] = self.root_path.encode("ascii") + raw_path
        app: ASGI3Application = self.app
        limit = self.limit_concurrency
        if limit is not None and (len(self.connections) >= limit or len(self.tasks) >= limit):
            app = service_unavailable
            self.logger.warning("Exceeded concurrency limit.")
        existing_cycle = self.cycle
        self.cycle = RequestResponseCycle(
            scope=scope,
            transport=self.transport,
            flow=self.flow,
            logger=self.logger,
            access_logger=self.access_logger,
            access_log=self.access_log,
            default_headers=self.server_state.default_headers,
            message_event=LiteEvent(),  # type: ignore[arg-type]
            expect_100_continue=self.expect_100_continue,
            keep_alive=http_version != "1.0" and parser.should_keep_alive(),
            on_response=self.on_response_complete,
        )
        self.url = b""
        self.headers = []
        if existing_cycle is None or existing_cycle.response_complete:
            self._start_asgi_task(self.cycle, app)
        else:  # pipelined: queued
            self.flow.pause_reading()
            self.pipeline.appendleft((self.cycle, app))

    def connection_lost(self, exc: Exception | None) -> None:
        upgraded = self.upgraded
        if upgraded is not None:  # handed over (``AnswersUpgrades._switch``): its end
            upgraded.connection_lost(exc)
            return
        if self.head_deadlines is not None:
            self.head_deadlines.done(self)
        super().connection_lost(exc)
        raw = self.raw_body
        if raw is not None:
            raw.lost()
        # uvicorn drops the parser here (its callbacks hold this protocol); a request's
        # cycle holds this protocol's ``on_response_complete`` too, and the body port its
        # cycle. Drop them as well: a closed connection's objects are then freed as soon
        # as the transport lets go, not left as cycles for the collector's next full pass
        # (after a reconnect storm, thousands of them). A task still running a request
        # keeps its own cycle.
        self.cycle = None  # type: ignore[assignment]
        self.raw_body = None
        self.pipeline.clear()


# httptools < 0.6.3 has no leniencies to set.
_LENIENCIES = hasattr(httptools.HttpRequestParser, "set_dangerous_leniencies")


def _flow_control(transport: asyncio.Transport) -> FlowControl:
    """uvicorn's ``FlowControl(transport)`` with a ``LiteEvent`` for its writable event
    (less memory per idle stream: no empty waiter deque), not an ``asyncio.Event`` made
    and dropped at once."""
    flow = FlowControl.__new__(FlowControl)
    flow._transport = transport
    flow.read_paused = False
    flow.write_paused = False
    writable = LiteEvent()
    writable.set()
    flow._is_writable_event = writable  # type: ignore[assignment]
    return flow


class _ScopeHead:
    """What a ``StreamOpener`` sees of a request (``RequestHead``): its ASGI scope."""

    __slots__ = ("_scope",)

    def __init__(self, scope: dict[str, Any]) -> None:
        self._scope = scope

    @property
    def path(self) -> str:
        path: str = self._scope["path"]
        return path

    @property
    def query_string(self) -> bytes:
        query: bytes = self._scope["query_string"]
        return query

    def header(self, name: str) -> str | None:
        wanted = name.lower().encode("latin-1")
        for key, value in self._scope["headers"]:
            if key == wanted:
                found: str = value.decode("latin-1")
                return found
        return None
