"""uvicorn's websockets-sansio protocol, as a ``WebSocketPort`` (``gateway.server.ports``).

What it adds to uvicorn's (``GatewayWebSocketProtocol``, installed by
``gateway.server.options`` unless ``GATEWAY_RAW_WRITES=false``):

- The port itself, offered in ``scope["extensions"][RAW_FRAMES]``: frames built once
  per publication (``gateway.wire``) are handed to the socket with one
  ``transport.write``, with uvicorn's flow control kept (a full socket says "not
  now"). Going through ASGI costs a message dict, Starlette's ``send`` wrappers and
  websockets' frame serialisation per delivery. Control frames (ping, close) still go
  through the websockets state machine; every write is whole frames, so they never
  interleave inside one.
- The handshake below ASGI, when this protocol parses it (h11, no httptools): an
  upgrade the app's opener (``OPEN_WEBSOCKET``) takes is answered here
  (``handle_connect``), the 101 as uvicorn writes it on ``websocket.accept``, then the
  app's connection on this port; no ASGI call at all. (Under httptools the HTTP protocol
  answers it and hands the socket to ``gateway.server.upgraded`` instead.)
- Detached connections: ``hold`` lets the ASGI call return while the connection
  stays open; its messages reach the owner through the ``listen`` callback. An idle
  connection then keeps no task and none of the framework's coroutine frames
  (routing, middleware, dependency exit stacks). ``run_asgi`` is uvicorn's, copied,
  with that one branch more: ``COPIED_FROM_UVICORN`` records the fingerprint of the
  original, and tests/test_server_adapter.py fails when uvicorn's changes.
- The contract's close reason for oversized frames: the parser refuses a frame over
  ``ws_max_size`` (``GATEWAY_MAX_MESSAGE_BYTES``) and closes with 1009 and its own
  wording; the contract says ``message too big``.
- Less memory per idle connection: no empty deques (``gateway.server.waiting``), the
  handshake's headers are dropped once accepted, and keep-alive pings come from one
  timer per event loop (``Keepalive``) instead of uvicorn's two timers per connection.
  The contract's liveness rule is unchanged: a ping every ``ws_ping_interval``, and a
  connection whose pong has not come ``ws_ping_timeout`` after its ping is closed
  (1011), checked every quarter of the shorter of the two.
"""

from __future__ import annotations

import logging
import random
import struct
from collections.abc import Callable
from typing import Any, cast
from urllib.parse import unquote

from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.exceptions import PayloadTooBig
from websockets.frames import Close, Frame, Opcode
from websockets.http11 import Request

from gateway.errors import CloseCode
from gateway.server.keepalive import Bucket, keepalive_for
from gateway.server.ports import (
    OPEN_WEBSOCKET,
    RAW_FRAMES,
    Accept,
    Deferred,
    Opener,
    Refuse,
    WebSocketPort,
)
from gateway.server.waiting import LiteEvent, LiteQueue

# What was copied from uvicorn and the sha256 (first 16 hex digits) of the original's
# dedented source when it was copied; tests/test_server_adapter.py compares.
COPIED_FROM_UVICORN = {
    "uvicorn.protocols.websockets.websockets_sansio_impl:WebSocketsSansIOProtocol.run_asgi": (
        "632f86c7cd771ab9"
    ),
}


class _Upgrade:
    """What an ``Opener`` sees of the upgrade request (``gateway.server.ports.RequestHead``)."""

    __slots__ = ("_request",)

    def __init__(self, request: Request) -> None:
        self._request = request

    @property
    def path(self) -> str:
        return unquote(self._request.path.partition("?")[0])

    @property
    def query_string(self) -> bytes:
        return self._request.path.partition("?")[2].encode("latin-1")

    def header(self, name: str) -> str | None:
        values = self._request.headers.get_all(name)
        return values[0] if values else None


class GatewayWebSocketProtocol(WebSocketsSansIOProtocol):
    # The HTTP protocol hands the upgrades it answers to ``UpgradedWebSocket`` instead
    # (``gateway.server.http``); this class serves the handshakes uvicorn answers.
    lends_upgrades = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Idle connections are the common case: no empty deques held for their lifetime.
        self.queue = LiteQueue()  # type: ignore[assignment]
        self.writable = LiteEvent()  # type: ignore[assignment]
        self.writable.set()
        self.detached = False
        self.keepalive_bucket: Bucket | None = None  # where ``Keepalive`` holds it

    async def send(self, message: Any) -> None:
        await super().send(message)
        if message["type"] == "websocket.accept":
            # The handshake is done; its headers are referenced for the connection's
            # life (also from the parser's frame), so empty them instead.
            request, response = getattr(self, "request", None), getattr(self, "response", None)
            for held in (request, response):
                if held is not None:
                    held.headers.clear()

    def handle_connect(self, event: Request) -> None:
        opener: Opener | None = self.app_state.get(OPEN_WEBSOCKET)
        decision = opener(_Upgrade(event)) if opener is not None else None
        if isinstance(decision, Deferred):
            decision = None  # no waiting here: the ASGI endpoint decides
        if decision is not None and self._handshake(event):
            self._open(decision)
            return
        super().handle_connect(event)
        scope: dict[str, Any] | None = getattr(self, "scope", None)
        if scope is not None:  # the handshake was valid: the app runs
            scope["extensions"][RAW_FRAMES] = self

    # -- the handshake below ASGI (see the module docstring) ---------------------

    def _handshake(self, event: Request) -> bool:
        """Answer the upgrade with its 101 here, as uvicorn does on ``websocket.accept``;
        False (nothing done) for a handshake uvicorn must refuse itself."""
        response = self.conn.accept(event)
        if response.status_code != 101 or self.transport.is_closing():
            return False
        self.request, self.response = event, response
        del response.headers["Date"]
        response.headers.update(
            (name.decode("latin-1").lower(), value.decode("latin-1"))
            for name, value in self.default_headers
        )
        self.conn.send_response(response)
        # The connection is open, and no ASGI call will ever run.
        self.handshake_initiated = self.handshake_complete = True
        self.detached = True
        self.scope = {"type": "websocket"}  # type: ignore[typeddict-item]
        if self.config.access_log and self.logger.isEnabledFor(logging.INFO):
            peer = f"{self.client[0]}:{self.client[1]}" if self.client else ""
            self.logger.info('%s - "WebSocket %s" [accepted]', peer, event.path)
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.start_keepalive()
        event.path = ""  # the token, in the query, is kept no longer than the handshake
        event.headers.clear()
        response.headers.clear()
        return True

    def _open(self, decision: Accept | Refuse) -> None:
        if isinstance(decision, Refuse):
            self._close_now(decision.code, decision.reason)
        else:  # uvicorn types receive() as its own event union: the port all the same
            decision(cast(WebSocketPort, self))

    def _close_now(self, code: int, reason: str) -> None:
        """A close frame right after the handshake (what ASGI ``websocket.close`` does)."""
        self.conn.send_close(code, reason)
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.close_sent = True
        self.close_timer = self.loop.call_later(self.close_timeout, self.transport.close)

    # -- the port (gateway.server.ports.WebSocketPort) -------------------------

    def listen(
        self, on_message: Callable[[], object], take: Callable[[Any], bool] | None = None
    ) -> None:
        queue: LiteQueue[Any] = self.queue  # type: ignore[assignment]
        # Called soon, not from inside the put: uvicorn pauses reading right after it
        # queues a message, and only a ``take`` that finds it paused resumes it.
        queue.on_put = lambda: self.loop.call_soon(on_message)
        if not queue.empty():
            on_message()

    def pending(self) -> bool:
        return not self.queue.empty()

    def take(self) -> Any:
        """uvicorn's ``receive`` for a message that waits: reading resumes once none does."""
        message = self.queue.get_nowait()
        if self.read_paused and self.queue.empty():
            self.read_paused = False
            self.transport.resume_reading()
        return message

    def try_write(self, frames: bytes) -> bool:
        if self.close_sent or self.disconnected or self.transport.is_closing():
            raise ConnectionError("websocket closed")
        if not self.writable.is_set():
            return False
        self.transport.write(frames)
        return True

    async def write(self, frames: bytes) -> None:
        while not self.try_write(frames):
            await self.writable.wait()

    async def close(self, code: int, reason: str) -> None:
        if self.close_sent or self.disconnected or self.transport.is_closing():
            return  # closed already (a parser error, a keep-alive timeout, the client)
        await self.send({"type": "websocket.close", "code": code, "reason": reason})

    async def hold(self) -> None:
        """Detach: the ASGI call may return, the connection stays (see ``run_asgi``)."""
        self.detached = True

    def release(self) -> None:
        """Nothing to do: a detached connection has no ASGI call waiting."""

    def _forget_request(self) -> None:
        """Drop what only the ASGI call needed, once it returned: the scope (with what
        the framework stored in it) and the request's path, which carries the token."""
        self.scope = {"type": "websocket"}  # type: ignore[typeddict-item]
        request = getattr(self, "request", None)
        if request is not None:  # also held by the websockets parser's suspended frame
            request.path = ""

    async def run_asgi(self) -> None:
        # uvicorn's (COPIED_FROM_UVICORN), except that a detached connection stays open.
        try:
            result = await self.app(self.scope, self.receive, self.send)
        except ClientDisconnected:
            pass
        except BaseException:
            self.logger.exception("Exception in ASGI application\n")
            self.send_500_response()
        else:
            if not self.handshake_complete:
                self.logger.error("ASGI callable returned without completing handshake.")
                self.send_500_response()
            elif result is not None:
                self.logger.error("ASGI callable should return None, but returned '%s'.", result)
            elif self.detached:
                self._forget_request()
                return
        if self.close_timer is None:
            self.transport.close()

    # -- keep-alive from one timer per loop (see the module docstring) ---------

    def start_keepalive(self) -> None:
        interval = self.ping_interval
        if interval is None or interval <= 0:
            return
        keepalive = keepalive_for(self.loop, interval, self.ping_timeout)
        self.ping_sent_at = self.loop.time()  # the first ping one interval from now
        self.keepalive_bucket = keepalive.add(self)

    def stop_keepalive(self) -> None:
        super().stop_keepalive()
        if self.keepalive_bucket is not None:
            self.keepalive_bucket.pop(self, None)
            self.keepalive_bucket = None

    def keepalive_check(self, now: float) -> None:
        """Called by ``Keepalive`` every tick: time out a missing pong, or send a ping."""
        if self.close_sent or self.transport.is_closing():
            return
        if self.pending_ping_payload is not None:
            timeout = self.ping_timeout
            if timeout is not None and now - self.ping_sent_at >= timeout:
                self.keepalive_timeout()
            return
        assert self.ping_interval is not None
        if now - self.ping_sent_at >= self.ping_interval:
            self.pending_ping_payload = struct.pack("!I", random.getrandbits(32))
            self.ping_sent_at = now
            self.conn.send_ping(self.pending_ping_payload)
            self.transport.write(b"".join(self.conn.data_to_send()))

    # -- oversized frames --------------------------------------------------------

    def handle_parser_exception(self) -> None:
        """A client that broke the protocol: the close frame (ours for a message too big,
        websockets' otherwise), then our end of the connection (FIN); what the client
        still sends is dropped (the parser discards it) until it closes its end, for the
        close timeout at most. uvicorn closes at once, and the client's unread bytes make
        the kernel answer with a reset that destroys the close frame (a 1006 instead)."""
        if self.close_sent:  # called again for each later read: dropped
            self.conn.data_to_send()
            return
        if isinstance(self.conn.parser_exc, PayloadTooBig):
            code, reason = CloseCode.MESSAGE_TOO_BIG
            self.conn.data_to_send()  # drop the parser's own close frame
            close = Frame(Opcode.CLOSE, Close(code, reason).serialize()).serialize(mask=False)
        else:
            assert self.conn.close_sent is not None
            code, reason = self.conn.close_sent.code, self.conn.close_sent.reason
            close = b"".join(self.conn.data_to_send())
        self.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
        self.transport.write(close)
        self.close_sent = True
        self.transport.write_eof()
        if self.close_timer is None:
            self.close_timer = self.loop.call_later(self.close_timeout, self.transport.close)
