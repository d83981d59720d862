"""The WebSocket protocol of a connection the HTTP protocol upgraded itself.

When the app's opener takes an upgrade (``gateway.server.http``), the connection
needs nothing of uvicorn's WebSocket protocol: no scope, no ASGI call, no handshake
parser. ``UpgradedWebSocket`` is what is left, a ``WebSocketPort`` on the socket:

- frames in, parsed here (RFC 6455 section 5) as websockets parses them, with the
  same answers to a client that breaks the protocol (1002 and websockets' wording;
  1007 for text that is not UTF-8; 1009 ``message too big`` for a message over
  ``ws_max_size``, from its header), then a half-close; pings answered while it reads;
- messages out to the owner as ASGI ``websocket.*`` dicts (``listen``/``receive``),
  reading paused while too many wait, as uvicorn pauses while one does;
- frames out as built by ``gateway.wire`` (``try_write``/``write``, with the
  transport's flow control; what the owner writes while a read is handled, in one
  write), close frames and the closing handshake as uvicorn's protocol does them, the
  same keep-alive (``Keepalive``: one timer per loop);
- uvicorn's server still sees it among its connections (``shutdown``: 1012).

One object per connection; ``GatewayWebSocketProtocol`` (websockets' state machine)
is for the handshakes uvicorn answers (h11, a refused one).
"""

from __future__ import annotations

import asyncio
import logging
import random
import struct
from collections import deque
from collections.abc import Callable
from typing import Any, Final

from gateway.logs import REDACTED_ALREADY, redact
from gateway.server.addresses import peer
from gateway.server.frames import (
    CLOSE,
    CONT,
    PING,
    PONG,
    TEXT,
    ProtocolViolation,
    close_payload,
    control_frame,
    parse_close,
    read_frame,
)
from gateway.server.keepalive import Bucket, keepalive_for
from gateway.server.waiting import WriteFlow, close_transport

logger = logging.getLogger("uvicorn.error")

PAUSE_READING_AT: Final = 32  # messages waiting for the owner
CLOSE_TIMEOUT: Final = 10.0  # uvicorn's: the client's answer to our close frame
# What one read's replies may cork (a transport's default high-water mark): past it they
# go out at once, and the socket's flow control (and so the session's bound) applies.
CORK_BYTES: Final = 65_536

Message = dict[str, Any]
ACCEPTED: Final = '%s - "WebSocket %s" [accepted]'  # uvicorn's line


class UpgradedWebSocket(WriteFlow, asyncio.Protocol):
    def __init__(
        self,
        *,
        connections: set[Any],
        max_size: int,
        ping_interval: float | None,
        ping_timeout: float | None,
        client: tuple[str, int] | None,
        access_log: bool = True,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        # (the running one, given when the caller has it: asking asyncio costs a getpid)
        self.loop = loop if loop is not None else asyncio.get_running_loop()
        self.connections = connections
        self.max_size = max_size
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.client = client
        self.access_log = access_log
        self.transport: asyncio.Transport
        # Messages the owner has not taken, and its ``listen``: most are taken as they
        # come, so the deque, like the event for a paused socket, is made on first use.
        self._messages: deque[Message] | None = None
        self._on_message: Callable[[], object] | None = None
        self.write_paused, self._writable = False, None  # (``WriteFlow``)
        self.close_sent = self.ended = self._read_paused = False
        self.close_timer: asyncio.TimerHandle | None = None
        self.pending_ping: bytes | None = None
        self.ping_sent_at = self.last_ping_rtt = 0.0
        self._keepalive: Bucket | None = None  # where ``Keepalive`` holds this connection
        self._buffer = b""
        self._fragments: list[bytes] | None = None
        self._fragments_size, self._fragments_text = 0, False
        self._take: Callable[[Message], bool] | None = None  # the owner's (``listen``)
        self._cork: list[bytes] | None = None  # frames written while a read is handled
        self._corked = 0  # their bytes
        self._dropping = False  # past a protocol error: what the client sends is dropped

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.connections.add(self)

    def open(self, head: bytes, target: bytes) -> None:
        """Write the 101 ``head``: from here the connection speaks WebSocket."""
        if self.access_log and logger.isEnabledFor(logging.INFO):
            client = self.client
            if client is None:  # (the front door's: asked only for this line)
                client = self.client = peer(self.transport.get_extra_info("peername"))
            peer_text = f"{client[0]}:{client[1]}" if client else ""
            target_text = redact(target.decode("latin-1"))  # once, here, not in each filter
            logger.info(ACCEPTED, peer_text, target_text, extra={REDACTED_ALREADY: True})
        self.transport.write(head)
        interval = self.ping_interval
        if interval is not None and interval > 0:
            self.ping_sent_at = self.loop.time()  # the first ping one interval from now
            self._keepalive = keepalive_for(self.loop, interval, self.ping_timeout).add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_keepalive()
        self.connections.discard(self)
        self._disconnect(1005, "")  # no close frame either way: uvicorn's code for it
        self.wake_writers()  # a writer waiting on a full socket learns it is gone
        if self.close_timer is not None:
            self.close_timer.cancel()
            self.close_timer = None
        if exc is None:
            self.transport.close()

    def refuse(self, code: int, reason: str) -> None:
        """A close frame right after the 101 (what ASGI ``websocket.close`` does then)."""
        self._disconnect(code, reason)
        self._send(control_frame(CLOSE, close_payload(code, reason)))
        self.close_sent = True
        self.close_timer = self.loop.call_later(CLOSE_TIMEOUT, close_transport, self.transport)

    def shutdown(self) -> None:
        """uvicorn's server is stopping (after the app's drain closed its sessions)."""
        self._stop_keepalive()
        if self.close_sent:
            close_transport(self.transport)
            return
        self._fail(1012, "")

    # -- frames in ---------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        """Handle what the client sent; the frames the owner writes meanwhile (a
        subscribe's reply and what it recovers, the replies to several commands sent
        together) go out in one socket write when it is done."""
        if self._dropping:
            return
        if self._buffer:
            data, self._buffer = self._buffer + data, b""
        cork: list[bytes] = []
        self._cork, self._corked = cork, 0
        try:
            self._parse(data)
        except ProtocolViolation as exc:
            self._refuse_client(exc.code, exc.reason)
        finally:
            self._uncork(cork)

    def _uncork(self, cork: list[bytes]) -> None:
        # (A method of its own: here ``self._cork`` is read as declared, None included,
        # not as the list the caller set it to, which compiled code would insist on.)
        if self._cork is cork:  # (not written already: CORK_BYTES, a close frame)
            self._cork = None
            if cork and not self.transport.is_closing():
                self.transport.write(cork[0] if len(cork) == 1 else b"".join(cork))

    def _send(self, data: bytes) -> None:
        """The protocol's own frames (pong, close), in order with the owner's."""
        cork = self._cork
        if cork is not None:
            self._add_to(cork, data)
        else:
            self.transport.write(data)

    def _add_to(self, cork: list[bytes], data: bytes) -> None:
        cork.append(data)
        self._corked += len(data)
        if self._corked >= CORK_BYTES:  # a socket's worth: out now, flow control again
            self._cork = None
            self.transport.write(b"".join(cork))

    def _send_last(self, data: bytes) -> None:
        """A close frame before the transport closes: with what was corked, if anything
        was (nothing is once a close frame is sent: ``try_write`` refuses)."""
        cork, self._cork = self._cork, None
        self.transport.write(b"".join([*cork, data]) if cork else data)

    def _parse(self, data: bytes) -> None:
        size, at = len(data), 0
        transport = self.transport
        while size - at >= 2 and not transport.is_closing():
            frame = read_frame(data, at, self.max_size - self._fragments_size)
            if frame is None:
                break
            head1, payload, at = frame
            if head1 & 0x70:  # checked once the frame is read, as websockets does
                raise ProtocolViolation(1002, "reserved bits must be 0")
            self._frame(head1 & 0x0F, bool(head1 & 0x80), payload)
        if at < size and not transport.is_closing():
            self._buffer = data[at:]

    def _frame(self, opcode: int, fin: bool, payload: bytes) -> None:
        if opcode >= CLOSE:
            if len(payload) > 125:
                raise ProtocolViolation(1002, "control frame too long")
            if not fin:
                raise ProtocolViolation(1002, "fragmented control frame")
            if opcode == PING:  # no pong to a client that does not read (RFC 6455 5.5.3)
                if not self.close_sent and not self.write_paused:
                    self._send(control_frame(PONG, payload))
            elif opcode == PONG:
                if payload == self.pending_ping:
                    self.pending_ping = None
                    self.last_ping_rtt = self.loop.time() - self.ping_sent_at
            else:
                self._close_received(payload)
            return
        fragments = self._fragments
        if opcode == CONT:
            if fragments is None:
                raise ProtocolViolation(1002, "unexpected continuation frame")
            if payload:  # (an empty one adds nothing: a flood of them is no memory)
                fragments.append(payload)
            self._fragments_size += len(payload)
            if fin:
                text = self._fragments_text
                self._fragments, self._fragments_size = None, 0
                self._message(text, b"".join(fragments))
        elif fragments is not None:
            raise ProtocolViolation(1002, "expected a continuation frame")
        elif fin:
            self._message(opcode == TEXT, payload)
        else:
            self._fragments, self._fragments_size = [payload], len(payload)
            self._fragments_text = opcode == TEXT

    def _message(self, text: bool, payload: bytes) -> None:
        if self.close_sent:
            return  # past our close frame: what the client still sends is dropped
        if text:
            try:
                message: Message = {"type": "websocket.receive", "text": payload.decode()}
            except UnicodeDecodeError:
                raise ProtocolViolation(1007, "") from None
        else:
            message = {"type": "websocket.receive", "bytes": payload}
        if self._taken(message):
            return
        self._queue(message)
        if not self._read_paused and self._messages and len(self._messages) >= PAUSE_READING_AT:
            self._read_paused = True
            self.transport.pause_reading()

    def _close_received(self, payload: bytes) -> None:
        if self.close_sent:  # the client's answer: the closing handshake is done
            close_transport(self.transport)
            return
        code, reason = parse_close(payload)
        self._disconnect(code, reason)
        self._send_last(control_frame(CLOSE, payload))  # echoed, as websockets does
        self.close_sent = True
        close_transport(self.transport)

    def _refuse_client(self, code: int, reason: str) -> None:
        """A client that broke the protocol: our close frame, our end (FIN), then what it
        sends is dropped until it closes (closing now would reset it: a 1006 instead)."""
        self._disconnect(code, reason)
        self._dropping = True
        self._buffer, self._fragments = b"", None
        transport = self.transport
        if self.close_sent or transport.is_closing():
            close_transport(transport)
            return
        self._send_last(control_frame(CLOSE, close_payload(code, reason)))
        self.close_sent = True
        transport.write_eof()
        if self.close_timer is None:
            self.close_timer = self.loop.call_later(CLOSE_TIMEOUT, close_transport, transport)

    def _fail(self, code: int, reason: str) -> None:
        """Close at once with ``code``: a client that broke the protocol, a shutdown."""
        self._disconnect(code, reason)
        if not self.close_sent and not self.transport.is_closing():
            self._send_last(control_frame(CLOSE, close_payload(code, reason)))
        self.close_sent = True
        close_transport(self.transport)

    def _disconnect(self, code: int, reason: str) -> None:
        """Tell the owner the connection ended (once)."""
        if not self.ended:
            self.ended = True
            message = {"type": "websocket.disconnect", "code": code, "reason": reason}
            if not self._taken(message):
                self._queue(message)

    def _taken(self, message: Message) -> bool:
        """Whether the owner took ``message`` as it came (``listen``'s ``take``, offered
        while none waits before it): then no queue and no wake-up."""
        take = self._take
        return take is not None and not self._messages and take(message)

    def _queue(self, message: Message) -> None:
        """``message`` for the owner to ``take``; the owner told (``listen``)."""
        if self._messages is None:
            self._messages = deque()
        self._messages.append(message)
        if self._on_message is not None:
            self._on_message()

    # -- the port (gateway.server.ports.WebSocketPort) ---------------------------------

    def listen(
        self, on_message: Callable[[], object], take: Callable[[Message], bool] | None = None
    ) -> None:
        self._on_message = on_message
        self._take = take
        if self._messages:
            on_message()

    def pending(self) -> bool:
        return bool(self._messages)

    def take(self) -> Message:
        messages = self._messages
        if not messages:
            raise asyncio.QueueEmpty
        message = messages.popleft()
        if self._read_paused and not messages:
            self._read_paused = False
            if not self.transport.is_closing():
                self.transport.resume_reading()
        return message

    def try_write(self, frames: bytes) -> bool:
        if self.close_sent or self.transport.is_closing():
            raise ConnectionError("websocket closed")
        if self.write_paused:
            return False
        cork = self._cork
        if cork is not None:  # inside data_received: sent with the read's other frames
            self._add_to(cork, frames)
            return True
        self.transport.write(frames)
        return True

    async def write(self, frames: bytes) -> None:
        while not self.try_write(frames):
            await self.resumed()

    async def close(self, code: int, reason: str) -> None:
        if self.close_sent or self.transport.is_closing():
            return  # closed already (a protocol error, a keep-alive timeout, the client)
        while self.write_paused and not self.transport.is_closing():
            await self.resumed()  # whole frames only: behind what is queued
        if self.close_sent or self.transport.is_closing():
            return
        if self._read_paused:
            self._read_paused = False
            self.transport.resume_reading()
        self.refuse(code, reason)

    async def hold(self) -> None:
        """Nothing to hold: no ASGI call runs for this connection."""

    def release(self) -> None:
        """The owner is done with the connection: forget its listener, the one edge from
        this protocol back to the owner (which holds it as its port), so that both are
        freed as soon as the transport lets go, not at the collector's next full pass."""
        self._on_message = None
        self._take = None

    # -- keep-alive (``Keepalive``) ----------------------------------------------------

    def keepalive_check(self, now: float) -> None:
        if self.close_sent or self.transport.is_closing():
            return
        if self.pending_ping is not None:
            timeout = self.ping_timeout
            if timeout is not None and now - self.ping_sent_at >= timeout:
                self._fail(1011, "keepalive ping timeout")
            return
        assert self.ping_interval is not None
        if now - self.ping_sent_at >= self.ping_interval:
            self.pending_ping = struct.pack("!I", random.getrandbits(32))
            self.ping_sent_at = now
            self.transport.write(control_frame(PING, self.pending_ping))

    def _stop_keepalive(self) -> None:
        if self._keepalive is not None:
            self._keepalive.pop(self, None)
            self._keepalive = None
        self.pending_ping = None
