"""Baseline (b): ``websockets.broadcast()`` over one Redis subscription - the practical
ceiling of a Python fan-out server.

One Redis pub/sub connection for the process, subscribed to each channel that has a
client; every message is written to all of the channel's connections synchronously by
``broadcast()``, without awaiting any of them (and so, as its docstring says, without
backpressure: a slow client's buffer grows until its ping times out).

    python -m loadtest.baselines.websockets_broadcast --port 8003 --redis-url redis://…
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

import orjson
from redis.asyncio import Redis
from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.http11 import Request, Response

from loadtest.baselines._cli import parse_args


class Hub:
    def __init__(self, redis_url: str) -> None:
        self.redis = Redis.from_url(redis_url)
        self.pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        self.clients: dict[str, set[ServerConnection]] = {}

    async def join(self, channel: str, connection: ServerConnection) -> None:
        if channel not in self.clients:
            self.clients[channel] = set()
            await self.pubsub.subscribe(channel)
        self.clients[channel].add(connection)

    async def leave(self, channel: str, connection: ServerConnection) -> None:
        members = self.clients.get(channel)
        if members is None:
            return
        members.discard(connection)
        if not members:
            del self.clients[channel]
            await self.pubsub.unsubscribe(channel)

    async def run(self) -> None:
        while True:
            if not self.pubsub.subscribed:
                await asyncio.sleep(0.05)
                continue
            message = await self.pubsub.get_message(timeout=1.0)
            if message and message["type"] == "message":
                channel = message["channel"].decode()
                broadcast(self.clients.get(channel, ()), message["data"], text=True)


async def serve_forever(host: str, port: int, redis_url: str) -> None:
    hub = Hub(redis_url)

    async def handler(connection: ServerConnection) -> None:
        query = parse_qs(urlsplit(connection.request.path if connection.request else "").query)
        channel = query.get("channel", ["bench"])[0]
        await hub.join(channel, connection)
        try:
            await connection.send(orjson.dumps({"ready": channel}).decode())
            await connection.wait_closed()
        finally:
            await hub.leave(channel, connection)

    def health(connection: ServerConnection, request: Request) -> Response | None:
        if request.path == "/healthz":
            return connection.respond(HTTPStatus.OK, "ok\n")
        return None

    reader = asyncio.create_task(hub.run())
    async with serve(handler, host, port, process_request=health, compression=None) as server:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, server.close)
        with contextlib.suppress(asyncio.CancelledError):
            await server.wait_closed()
    reader.cancel()
    await hub.redis.aclose()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__, argv)
    import uvloop

    uvloop.run(serve_forever(args.host, args.port, args.redis_url))


if __name__ == "__main__":
    main()
