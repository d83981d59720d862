"""How each server under test is spoken to: URL, opening frames, and what a frame means.

A dialect turns one received WebSocket frame, or one SSE event, into one of:

* a payload ``dict`` (``{"seq", "s", "t", "pad"}``, what the publisher sent),
* ``READY`` (the subscription is live: publishing may start),
* ``Failed(reason)`` (the server refused the subscription),
* ``Reply(frame)`` (a frame to send back, e.g. Socket.IO's pong), ``Later(frame, delay)``
  (one to send a little later),
* ``None`` (anything else: heartbeats, presence, gaps).

Every server forwards the publisher's JSON unchanged, so latency is always measured
from the payload's own ``t``. The baselines announce a live subscription with a
``{"ready": channel}`` frame (SSE: ``event: ready``), which the tutorial code they copy
does not have; the gateway's subscribe reply and SSE ``retry:`` opening do the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote

import orjson

loads = orjson.loads


class _Ready:
    __slots__ = ()

    def __repr__(self) -> str:
        return "READY"


READY = _Ready()


@dataclass(frozen=True, slots=True)
class Failed:
    reason: str


@dataclass(frozen=True, slots=True)
class Reply:
    frame: bytes


@dataclass(frozen=True, slots=True)
class Later:
    """A frame to send ``delay`` seconds from now (a command retried, as ``client.js``
    retries a subscribe the gateway could not serve for now)."""

    frame: bytes
    delay: float


Event = dict[str, Any] | _Ready | Failed | Reply | Later | None
Transport = Literal["ws", "sse"]


class WsDialect:
    transport: Transport = "ws"
    # The subscription is live once the handshake is done (no frame says so).
    ready_on_open = False

    def path(self, channel: str, token: str) -> str:
        raise NotImplementedError

    def hello(self, channel: str) -> list[bytes]:
        """Frames to send as soon as the WebSocket is open."""
        return []

    def per_connection(self) -> WsDialect:
        """The dialect one connection uses: this one, unless it keeps per-connection state."""
        return self

    def bind(self, conn: Any, recorder: Any) -> None:
        """The connection's accounting (``ConnState``, ``Recorder``), for a dialect that
        keeps per-connection state; nothing by default."""

    def parse(self, data: bytes, channel: str) -> Event:
        raise NotImplementedError


class SseDialect:
    transport: Transport = "sse"
    # The subscription is live once the response's headers say 200 (no event says so).
    ready_on_open = False

    def path(self, channel: str, token: str) -> str:
        raise NotImplementedError

    def parse(self, event: bytes | None, data: bytes | None, retry: bool) -> Event:
        raise NotImplementedError


class GatewayWs(WsDialect):
    """PROTOCOL.md: ``subscribe`` command, its reply, then ``{"channel", ..., "data"}`` pushes."""

    def path(self, channel: str, token: str) -> str:
        return f"/ws?token={quote(token)}"

    def hello(self, channel: str) -> list[bytes]:
        return [orjson.dumps({"id": 1, "op": "subscribe", "channel": channel})]

    def parse(self, data: bytes, channel: str) -> Event:
        message = loads(data)
        payload = message.get("data")
        if type(payload) is dict:
            return payload
        if "id" in message:
            if message.get("ok"):
                return READY
            return Failed(str(message.get("error")))
        return None


class GatewaySse(SseDialect):
    """The stream opens with ``retry:`` once subscribed; each event's data is a push."""

    def path(self, channel: str, token: str) -> str:
        return f"/sse?channel={quote(channel)}&token={quote(token)}"

    def parse(self, event: bytes | None, data: bytes | None, retry: bool) -> Event:
        if data is not None and event is None:
            payload = loads(data).get("data")
            return payload if type(payload) is dict else None
        if retry:
            return READY
        return None


class PlainWs(WsDialect):
    """The baselines: ``/ws?channel=C``, a ``{"ready": C}`` frame, then raw payloads."""

    def path(self, channel: str, token: str) -> str:
        return f"/ws?channel={quote(channel)}"

    def parse(self, data: bytes, channel: str) -> Event:
        message = loads(data)
        if "seq" in message:
            return message  # type: ignore[no-any-return]
        if "ready" in message:
            return READY
        return None


class PlainSse(SseDialect):
    """sse-starlette baseline: ``event: ready`` then one ``data:`` payload per event."""

    def path(self, channel: str, token: str) -> str:
        return f"/sse?channel={quote(channel)}"

    def parse(self, event: bytes | None, data: bytes | None, retry: bool) -> Event:
        if event is None and data:
            return loads(data)  # type: ignore[no-any-return]
        if event == b"ready":
            return READY
        return None


class NchanWs(WsDialect):
    """Nchan: ``/sub/C``; every message is its publisher's body as one text frame.

    Nchan sends nothing when the subscription starts: the client counts it live once the
    handshake is done. A subscriber whose channel's Redis subscription is still being set
    up misses nothing: it starts from the oldest message Nchan keeps for the channel
    (``nchan_subscriber_first_message`` defaults to ``oldest``), and the channel is new.
    """

    ready_on_open = True

    def path(self, channel: str, token: str) -> str:
        return f"/sub/{quote(channel, safe='')}"

    def parse(self, data: bytes, channel: str) -> Event:
        message = loads(data)
        return message if "seq" in message else None


class NchanSse(SseDialect):
    """Nchan's EventSource: ``: hi`` on opening, then ``id: <msg id>`` and ``data: <body>``
    per message (the client skips ``id:`` lines and comments)."""

    ready_on_open = True

    def path(self, channel: str, token: str) -> str:
        return f"/sub/{quote(channel, safe='')}"

    def parse(self, event: bytes | None, data: bytes | None, retry: bool) -> Event:
        if event is None and data:
            return loads(data)  # type: ignore[no-any-return]
        return None


class SocketIoWs(WsDialect):
    """Engine.IO 4 / Socket.IO 5 over a bare WebSocket (no polling upgrade).

    ``0{...}`` open -> send ``40`` (connect namespace ``/``) -> ``40{...}`` -> emit
    ``subscribe`` -> ``42["subscribed", C]``; publications arrive as ``42["pub", payload]``.
    The server pings (``2``), the client answers ``3``.
    """

    def path(self, channel: str, token: str) -> str:
        return "/socket.io/?EIO=4&transport=websocket"

    def parse(self, data: bytes, channel: str) -> Event:
        if data.startswith(b"42"):
            name, *args = loads(data[2:])
            if name == "pub" and args and type(args[0]) is dict:
                return args[0]
            if name == "subscribed":
                return READY
            return None
        if data == b"2":
            return Reply(b"3")
        if data.startswith(b"40"):
            return Reply(b'42["subscribe",' + orjson.dumps(channel) + b"]")
        if data.startswith(b"0"):
            return Reply(b"40")
        if data.startswith(b"44"):
            return Failed(data[2:].decode(errors="replace"))
        return None


Dialect = WsDialect | SseDialect
