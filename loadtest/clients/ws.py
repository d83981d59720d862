"""WebSocket subscriber on picows (Cython frame parser, callbacks on the event loop).

With ``stamped``, picows' protocol reads through ``StampedTransport`` (the kernel's
receive time of every read) instead of uvloop's transport: ``ws_connect`` cannot be
given a transport, so its protocol is made here as ``ws_connect`` makes it (picows'
``WSProtocol`` constructor is not public API: pyproject.toml bounds picows to the
versions this was tested on).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable

from picows import (
    WSAutoPingStrategy,
    WSCloseCode,
    WSFrame,
    WSListener,
    WSMsgType,
    WSTransport,
    ws_connect,
)
from picows.picows import WSProtocol  # type: ignore[attr-defined]  # not in its stub
from picows.url import parse_url

from loadtest.clients.net import open_socket
from loadtest.clients.slow import ReadThrottle
from loadtest.clients.stamped import StampedTransport
from loadtest.dialects import READY, Failed, Later, Reply, WsDialect
from loadtest.recorder import ConnState, Recorder

TEXT = WSMsgType.TEXT
CLOSE = WSMsgType.CLOSE
MAX_FRAME = 16 * 1024 * 1024


class WsClient(WSListener):
    """One subscribed WebSocket; every payload goes straight to the recorder."""

    def __init__(
        self,
        dialect: WsDialect,
        conn: ConnState,
        recorder: Recorder,
        ready: asyncio.Future[None],
        slow_interval: float | None,
    ) -> None:
        super().__init__()
        self.dialect = dialect
        self.conn = conn
        self.channel = conn.channel
        self.recorder = recorder
        self.ready = ready
        self.slow_interval = slow_interval
        self.throttle: ReadThrottle | None = None
        self.transport: WSTransport | None = None
        self.stamps: StampedTransport | None = None  # the kernel's receive times
        self.close_code: int | None = None
        self.closing = False
        self.disconnected: asyncio.Future[None] = ready.get_loop().create_future()
        dialect.bind(conn, recorder)

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        underlying = transport.underlying_transport
        if isinstance(underlying, StampedTransport):
            self.stamps = underlying
        for frame in self.dialect.hello(self.channel):
            transport.send(TEXT, frame)
        if self.dialect.ready_on_open:
            self._on_ready(transport)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        msg_type = frame.msg_type
        if msg_type == TEXT:
            now = time.time()
            try:
                event = self.dialect.parse(frame.get_payload_as_bytes(), self.channel)
            except Exception:
                self.recorder.foreign += 1
                return
            if type(event) is dict:
                stamps = self.stamps
                self.recorder.on_payload(
                    self.conn, event, now, stamps.arrived if stamps is not None else None
                )
                if self.throttle is not None:
                    self.throttle.on_data()
            elif event is READY:
                self._on_ready(transport)
            elif isinstance(event, Reply):
                transport.send(TEXT, event.frame)
            elif isinstance(event, Later):
                self.ready.get_loop().call_later(event.delay, self._send_later, event.frame)
            elif isinstance(event, Failed):
                if not self.ready.done():
                    self.ready.set_exception(ConnectionError(f"refused: {event.reason}"))
                self.closing = True
                transport.send_close(WSCloseCode.OK)
                transport.disconnect()
        elif msg_type == CLOSE:
            payload = frame.get_payload_as_bytes()
            self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            transport.send_close(frame.get_close_code())
            transport.disconnect()

    def _send_later(self, frame: bytes) -> None:
        if self.transport is not None and not self.transport.is_disconnected:
            self.transport.send(TEXT, frame)

    def _on_ready(self, transport: WSTransport) -> None:
        if self.ready.done():
            return
        self.recorder.on_ready(self.conn)
        self.ready.set_result(None)
        if self.slow_interval:
            self.throttle = ReadThrottle(transport.underlying_transport, self.slow_interval)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self.throttle is not None:
            self.throttle.cancel()
        self.recorder.on_closed(self.conn, self.close_code, expected=self.closing)
        if not self.ready.done():
            code = self.close_code if self.close_code is not None else "eof"
            self.ready.set_exception(ConnectionError(f"closed {code}"))
        if not self.disconnected.done():
            self.disconnected.set_result(None)

    def unthrottle(self) -> None:
        """A slow consumer starts reading at full speed (to see how the server closed it)."""
        if self.throttle is not None:
            self.throttle.cancel()
            self.throttle = None
            if self.transport is not None and not self.transport.is_disconnected:
                self.transport.underlying_transport.resume_reading()

    def close(self) -> None:
        """Close on our side (not counted as a server close)."""
        self.closing = True
        if self.transport is not None and not self.transport.is_disconnected:
            # 1000: picows' default (1005, "no status") may not be sent on the wire, and a
            # server answers it as a protocol error (1002).
            self.transport.send_close(WSCloseCode.OK)
            self.transport.disconnect()


async def connect_ws(
    dialect: WsDialect,
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
    stamped: bool = False,
) -> WsClient:
    """Connect, send the dialect's opening frames and wait until the subscription is live;
    ``stamped``: read the socket with the kernel's receive times (``StampedTransport``)."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    ready.add_done_callback(_retrieve)
    sock = await asyncio.wait_for(
        open_socket(host, port, local_ip=local_ip, rcvbuf=rcvbuf, stamped=stamped), timeout
    )
    url = f"ws://{host}:{port}{dialect.path(conn.channel, token)}"

    def factory() -> WsClient:
        return WsClient(dialect, conn, recorder, ready, slow_interval)

    try:
        if stamped:
            client = await _stamped(factory, url, sock, timeout)
        else:
            _, client = await ws_connect(
                factory,
                url,
                socket_factory=lambda _url: sock,
                websocket_handshake_timeout=timeout,
                enable_auto_pong=True,
                max_frame_size=MAX_FRAME,
                read_buffer_init_size=4096,
                logger_name="loadtest",
            )
    except BaseException:
        sock.close()
        raise
    assert isinstance(client, WsClient)
    try:
        await asyncio.wait_for(asyncio.shield(ready), timeout)
    except BaseException:
        client.close()
        raise
    return client


async def _stamped(
    factory: Callable[[], WsClient], url: str, sock: socket.socket, timeout: float
) -> WSListener:
    """``ws_connect``'s handshake over a ``StampedTransport``, with the options above."""
    parsed = parse_url(url)
    protocol = WSProtocol(
        parsed.netloc,
        parsed.resource_name,
        True,  # the client's side
        factory,
        logging.getLogger("picows.loadtest"),
        True,  # disconnect on an exception in a callback
        timeout,  # the handshake's
        False,  # no automatic pings
        10.0,
        10.0,
        WSAutoPingStrategy.PING_WHEN_IDLE,
        True,  # automatic pongs
        MAX_FRAME,
        None,  # no extra headers
        4096,  # the read buffer's initial size
    )
    transport = StampedTransport(asyncio.get_running_loop(), sock, protocol)
    try:
        await protocol.wait_until_handshake_complete()
    except BaseException:
        transport.abort()
        raise
    listener: WSListener = protocol.listener
    return listener


def _retrieve(future: asyncio.Future[None]) -> None:
    """Mark a failed readiness as seen: a timeout may have stopped waiting for it."""
    if not future.cancelled():
        future.exception()
