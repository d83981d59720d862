"""Ports over plain ASGI ``receive``/``send``: for any server that offers none of its own.

Under stock uvicorn (``GATEWAY_RAW_WRITES=false``), another ASGI server, or a response
the gateway's protocol cannot write to directly (an HTTP/1.0 client), the transports
get one of these. Same interface as the raw ports, same lifecycle for the transport;
what differs:

- ``try_write`` is always False: every push queues and the session's writer task sends
  it through ASGI ``send``, one message per frame or per chunk's data (the bytes the
  wire module built are unwrapped again: ``gateway.wire.text_payloads``,
  ``chunk_payloads``);
- the ASGI call cannot end before the connection does: ``hold`` keeps it, reading
  ``receive`` for the client's messages (a WebSocket) or its departure (a stream),
  until the owner calls ``release``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from typing import Any

from starlette.types import Message, Receive, Send
from starlette.websockets import WebSocketDisconnect

from gateway import wire

# What a failed ASGI send raises once the client is gone, depending on the server
# (uvicorn's ClientDisconnected is an OSError) and on Starlette's state checks.
_GONE = (OSError, RuntimeError, WebSocketDisconnect)


class AsgiWebSocketPort:
    """An accepted WebSocket over ASGI. ``hold`` reads ``receive`` one message at a
    time, as the owner takes them, so a client that floods commands is read no faster
    than they are handled."""

    __slots__ = ("_inbox", "_on_message", "_receive", "_released", "_send", "_taken")

    def __init__(self, receive: Receive, send: Send) -> None:
        self._receive = receive
        self._send = send
        self._inbox: deque[Message] = deque()
        self._on_message: Callable[[], object] | None = None
        self._taken = asyncio.Event()
        self._released = asyncio.Event()

    def listen(
        self, on_message: Callable[[], object], take: Callable[[Message], bool] | None = None
    ) -> None:
        self._on_message = on_message
        if self._inbox:
            on_message()

    def pending(self) -> bool:
        return bool(self._inbox)

    def take(self) -> Message:
        message = self._inbox.popleft()
        self._taken.set()
        return message

    def try_write(self, frames: bytes) -> bool:
        return False

    async def write(self, frames: bytes) -> None:
        try:
            for payload in wire.text_payloads(frames):
                await self._send({"type": "websocket.send", "text": payload.decode()})
        except _GONE as exc:
            raise ConnectionError("websocket closed") from exc

    async def close(self, code: int, reason: str) -> None:
        with contextlib.suppress(*_GONE):
            await self._send({"type": "websocket.close", "code": code, "reason": reason})

    async def hold(self) -> None:
        """Feed the owner what the client sends until it disconnects, then wait for the
        owner to ``release`` the connection."""
        while True:
            message = await self._receive()
            self._taken.clear()
            self._inbox.append(message)
            if self._on_message is not None:
                self._on_message()
            if message["type"] == "websocket.disconnect":
                break
            await self._taken.wait()
        await self._released.wait()

    def release(self) -> None:
        self._released.set()


class AsgiStreamPort:
    """A started chunked response over ASGI; ``hold`` watches ``receive`` for the
    client's departure until the owner calls ``release``."""

    __slots__ = ("_on_lost", "_receive", "_released", "_send")

    def __init__(self, receive: Receive, send: Send) -> None:
        self._receive = receive
        self._send = send
        self._on_lost: Callable[[], object] | None = None
        self._released = asyncio.Event()

    def on_lost(self, callback: Callable[[], object] | None) -> None:
        self._on_lost = callback

    def try_write(self, chunk: bytes) -> bool:
        return False

    async def write(self, chunk: bytes) -> None:
        body = wire.chunk_payloads(chunk)
        try:
            await self._send({"type": "http.response.body", "body": body, "more_body": True})
        except _GONE as exc:
            raise ConnectionError("response closed") from exc

    async def finish(self) -> None:
        await self._send({"type": "http.response.body", "body": b"", "more_body": False})
        self.release()

    def abort(self) -> None:
        """End the ASGI call unfinished: the server closes the connection."""
        self.release()

    async def hold(self) -> None:
        watch = asyncio.create_task(self._watch(), name="sse-disconnect")
        try:
            await self._released.wait()
        finally:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch

    async def _watch(self) -> None:
        message: dict[str, Any] = {}
        while message.get("type") != "http.disconnect":
            message = dict(await self._receive())
        callback, self._on_lost = self._on_lost, None
        if callback is not None:
            callback()

    def release(self) -> None:
        self._released.set()
