"""Baseline (f): the least a Python server on uvloop can do per connection.

An ``asyncio.Protocol`` with httptools parsing the request, the 101 written by hand,
frames built and parsed by hand, one Redis subscription per channel for the process:
no framework, no WebSocket library, no task per connection, no checks (no origin, no
token, no limits). It is not a server to deploy; it measures the cost of the event
loop, the parser and the kernel, which every Python server pays before its own work
(``python -m loadtest connect --target bare_protocol``).

    python -m loadtest.baselines.bare_protocol --port 8006 --redis-url redis://…
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import signal
import struct
from urllib.parse import parse_qs

import httptools
import orjson
from redis.asyncio import Redis

from loadtest.baselines._cli import parse_args

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
SWITCHING = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
HEALTHY = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nok\n"


def text_frame(payload: bytes) -> bytes:
    size = len(payload)
    if size < 126:
        return bytes((0x81, size)) + payload
    if size < 65536:
        return struct.pack("!BBH", 0x81, 126, size) + payload
    return struct.pack("!BBQ", 0x81, 127, size) + payload


class Hub:
    def __init__(self, redis_url: str) -> None:
        self.redis = Redis.from_url(redis_url)
        self.pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        self.clients: dict[bytes, set[Connection]] = {}
        self.subscribing: set[asyncio.Task[None]] = set()

    def join(self, channel: bytes, connection: Connection) -> None:
        members = self.clients.get(channel)
        if members is None:
            members = self.clients[channel] = set()
            task = asyncio.ensure_future(self.pubsub.subscribe(channel))
            self.subscribing.add(task)
            task.add_done_callback(self.subscribing.discard)
        members.add(connection)

    def leave(self, channel: bytes, connection: Connection) -> None:
        members = self.clients.get(channel)
        if members is not None:
            members.discard(connection)

    async def run(self) -> None:
        while True:
            if not self.pubsub.subscribed:
                await asyncio.sleep(0.05)
                continue
            message = await self.pubsub.get_message(timeout=1.0)
            if message and message["type"] == "message":
                frame = text_frame(message["data"])
                for connection in self.clients.get(message["channel"], ()):
                    connection.transport.write(frame)


class Connection(asyncio.Protocol):
    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.transport: asyncio.Transport
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.key = b""
        self.channel: bytes | None = None
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's TCPTransport

    # httptools callbacks
    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"sec-websocket-key":
            self.key = value

    def on_message_complete(self) -> None:
        if self.url.startswith(b"/healthz"):
            self.transport.write(HEALTHY)
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.channel is None:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserUpgrade as upgrade:
                self._accept()
                data = data[upgrade.args[0] :]
            except httptools.HttpParserError:
                self.transport.close()
                return
            else:
                return
        self._frames(self.buffer + data if self.buffer else data)

    def _accept(self) -> None:
        accept = base64.b64encode(hashlib.sha1(self.key + GUID).digest())
        query = parse_qs(self.url.partition(b"?")[2].decode("latin-1"))
        channel = query.get("channel", ["bench"])[0]
        self.channel = channel.encode()
        self.transport.write(SWITCHING + b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        self.hub.join(self.channel, self)
        self.transport.write(text_frame(orjson.dumps({"ready": channel})))

    def _frames(self, data: bytes) -> None:
        """Client frames are masked; only close (and ping) matter to a subscriber."""
        while len(data) >= 6:
            opcode, size, start = data[0] & 0x0F, data[1] & 0x7F, 2
            if size == 126:
                size, start = struct.unpack_from("!H", data, 2)[0], 4
            elif size == 127:
                size, start = struct.unpack_from("!Q", data, 2)[0], 10
            end = start + 4 + size
            if len(data) < end:
                break
            mask = data[start : start + 4] * (size // 4 + 1)
            payload = bytes(a ^ b for a, b in zip(data[start + 4 : end], mask, strict=False))
            data = data[end:]
            if opcode == 0x8:
                self.transport.write(bytes((0x88, len(payload))) + payload)
                self.transport.close()
                return
            if opcode == 0x9:
                self.transport.write(bytes((0x8A, len(payload))) + payload)
        self.buffer = data

    def connection_lost(self, exc: Exception | None) -> None:
        if self.channel is not None:
            self.hub.leave(self.channel, self)


async def serve_forever(host: str, port: int, redis_url: str) -> None:
    hub = Hub(redis_url)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Connection(hub), host, port, backlog=4096)
    reader = asyncio.create_task(hub.run())
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    server.close()
    reader.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await reader
    await hub.redis.aclose()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__, argv)
    import uvloop

    uvloop.run(serve_forever(args.host, args.port, args.redis_url))


if __name__ == "__main__":
    main()
