"""Publishers: the same payloads through the gateway's HTTP API, its Redis broker, Redis,
or an HTTP POST to Nchan's publisher location.

A payload is ``{"seq": n, "s": step, "t": time.time(), "pad": "x" * k}``: ``seq`` counts
per channel from 1, ``t`` is taken just before the publish call, so latency includes the
publish path (HTTP request or Redis round trip) as a user would see it.

``RatePublisher`` publishes at a fixed rate. Each channel belongs to one *lane* (a
sequential loop), so one channel's publications are sent one after another and their
``seq`` order is the order the server sees; more lanes publish more channels at once.
A failed publish does not consume its ``seq`` (the next attempt reuses it), so the
subscribers' loss accounting stays exact.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any, Protocol

import orjson

from loadtest.histogram import Histogram


def make_payload(seq: int, step: int, pad: str) -> bytes:
    return orjson.dumps({"seq": seq, "s": step, "t": time.time(), "pad": pad})


class Publisher(Protocol):
    name: str

    async def publish(self, channel: str, payload: bytes) -> None: ...

    async def close(self) -> None: ...


class ApiPublisher:
    """``POST /api/publish`` with a bearer token (the gateway's HTTP API)."""

    name = "api"

    def __init__(self, base_url: str, token: str) -> None:
        import httpx

        self._client = httpx.AsyncClient(
            base_url=base_url,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            timeout=10.0,
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=64),
        )

    async def publish(self, channel: str, payload: bytes) -> None:
        body = b'{"channel":' + orjson.dumps(channel) + b',"data":' + payload + b"}"
        response = await self._client.post("/api/publish", content=body)
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}")

    async def close(self) -> None:
        await self._client.aclose()


class GatewayBrokerPublisher:
    """The gateway's own publish path without HTTP: ``RedisBroker.publish`` (offsets,
    history and PUBLISH in one script), exactly what ``POST /api/publish`` calls."""

    name = "redis"

    def __init__(self, redis_url: str, key_prefix: str, history_size: int = 100) -> None:
        from channels.backend_url import create_backend
        from channels.broker import BrokerOptions

        options = BrokerOptions(key_prefix=key_prefix, history_size=history_size)
        self._broker = create_backend(redis_url, options).broker

    async def publish(self, channel: str, payload: bytes) -> None:
        await self._broker.publish(channel, payload)

    async def close(self) -> None:
        await self._broker.close()


class RedisPublisher:
    """Plain ``PUBLISH channel payload``: what the broadcaster and websockets baselines read."""

    name = "redis"

    def __init__(self, redis_url: str) -> None:
        from redis.asyncio import Redis

        self._redis = Redis.from_url(redis_url)

    async def publish(self, channel: str, payload: bytes) -> None:
        await self._redis.publish(channel, payload)

    async def close(self) -> None:
        await self._redis.aclose()


class SocketIoPublisher(RedisPublisher):
    """``PUBLISH socketio <message>``: the JSON message python-socketio's
    ``AsyncRedisManager.emit`` writes, emitting event ``pub`` to room ``channel``."""

    def __init__(self, redis_url: str, sio_channel: str = "socketio") -> None:
        super().__init__(redis_url)
        self._sio_channel = sio_channel

    async def publish(self, channel: str, payload: bytes) -> None:
        message = (
            b'{"method":"emit","event":"pub","data":['
            + payload
            + b'],"binary":false,"namespace":"/","room":'
            + orjson.dumps(channel)
            + b',"skip_sid":null,"callback":null,"host_id":"loadtest"}'
        )
        await self._redis.publish(self._sio_channel, message)


class NchanPublisher:
    """``POST /pub/<channel>`` with the payload as the body, to Nchan's publisher nginx
    (which stores it in Redis and publishes it there for the subscriber nginx).

    A bare HTTP/1.1 client on keep-alive connections: one request per connection at a
    time, a connection per concurrent caller (one per publishing lane), opened again
    when nginx closes it. Nchan answers 201 (subscribers present) or 202 (none)."""

    name = "nchan-http"

    def __init__(self, base_url: str) -> None:
        from urllib.parse import urlsplit

        parts = urlsplit(base_url)
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 80
        self._prefix = parts.path.rstrip("/") + "/pub/"
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._all: list[asyncio.StreamWriter] = []

    async def publish(self, channel: str, payload: bytes) -> None:
        from urllib.parse import quote

        request = (
            f"POST {self._prefix}{quote(channel, safe='')} HTTP/1.1\r\n"
            f"Host: {self._host}:{self._port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n"
        ).encode() + payload
        if self._idle:
            try:
                await self._request(request, *self._idle.pop())
                return
            except (ConnectionError, asyncio.IncompleteReadError):
                pass  # nginx closed the idle connection (keepalive_timeout): a new one
        reader, writer = await asyncio.open_connection(self._host, self._port)
        self._all.append(writer)
        await self._request(request, reader, writer)

    async def _request(
        self, request: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10.0)
            status_line, _, headers = head.partition(b"\r\n")
            length = 0
            keep = True
            for line in headers.split(b"\r\n"):
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"connection" and value.strip().lower() == b"close":
                    keep = False
            if length:
                await asyncio.wait_for(reader.readexactly(length), 10.0)
        except BaseException:
            writer.close()
            raise
        if keep:
            self._idle.append((reader, writer))
        else:
            writer.close()
        status = status_line.split(b" ", 2)[1] if b" " in status_line else b"?"
        if status not in (b"201", b"202"):
            raise RuntimeError(f"HTTP {status.decode(errors='replace')}")

    async def close(self) -> None:
        for writer in self._all:
            writer.close()
        self._all.clear()
        self._idle.clear()


class RatePublisher:
    def __init__(
        self, publisher: Publisher, channels: list[str], pad_bytes: int = 64, lanes: int = 1
    ) -> None:
        self.publisher = publisher
        self.channels = channels
        self.pad = "x" * pad_bytes
        self.lanes = max(1, min(lanes, len(channels)))
        self.seq: dict[str, int] = dict.fromkeys(channels, 0)
        self.published: Counter[tuple[str, int]] = Counter()  # (channel, step) -> count
        self.errors: Counter[str] = Counter()
        self.latency = Histogram()  # of the publish calls

    def published_in(self, step: int) -> dict[str, int]:
        return {ch: n for (ch, k), n in self.published.items() if k == step}

    async def run_step(self, step: int, rate: float, duration: float) -> dict[str, Any]:
        """Publish ``rate``/s for ``duration`` s, round-robin over the channels."""
        lane_channels = [self.channels[i :: self.lanes] for i in range(self.lanes)]
        total = max(1, round(rate * duration))
        started = time.time()
        behind = await asyncio.gather(
            *(
                self._lane(step, chans, rate * len(chans) / len(self.channels), total, i)
                for i, chans in enumerate(lane_channels)
            )
        )
        elapsed = time.time() - started
        published = sum(self.published_in(step).values())
        return {
            "target_rate": rate,
            "published": published,
            "elapsed_s": round(elapsed, 3),
            "achieved_rate": round(published / elapsed, 2) if elapsed > 0 else 0.0,
            "max_behind_s": round(max(behind), 3),
        }

    async def _lane(
        self, step: int, channels: list[str], rate: float, total: int, lane: int
    ) -> float:
        """One sequential publishing loop; returns how far behind schedule it fell."""
        loop = asyncio.get_running_loop()
        share = max(1, round(total * len(channels) / len(self.channels)))
        started = loop.time()
        worst = 0.0
        for i in range(share):
            due = started + i / rate
            delay = due - loop.time()
            if delay > 0.0005:
                await asyncio.sleep(delay)
            else:
                worst = max(worst, -delay)
            channel = channels[i % len(channels)]
            seq = self.seq[channel] + 1
            began = time.time()
            try:
                await self.publisher.publish(channel, make_payload(seq, step, self.pad))
            except Exception as exc:
                self.errors[f"{type(exc).__name__}: {exc}"[:80]] += 1
                continue
            self.latency.record_us(int((time.time() - began) * 1e6))
            self.seq[channel] = seq
            self.published[(channel, step)] += 1
        return worst
