"""A backend for the gateway's hooks that answers at once: the least a hook can cost.

An ``asyncio.Protocol`` on uvloop with httptools parsing the requests, HTTP/1.1
keep-alive, and one canned reply per hook (docs/protocol.md, "Backend hooks"):
``POST /connect`` and ``POST /subscribe`` answer ``{"result": "allow"}``,
``POST /publish`` ``{"result": "accept"}``, ``POST /rpc`` ``{"result": "ok"}``. The
body is not even read. What a real backend would do with the request (a database
look-up, a session check) is left out on purpose: ``python -m loadtest hooks``
measures what a hook costs the *gateway*, so the backend has to be as close to free
as a Python process can be.

It records its own service time per request (from the read that completed the
request to the reply handed to the socket, ``perf_counter_ns``: a client that sends
the head and the body in two writes is not charged for the gap between them), the
requests per path and the TCP connections opened for hook requests (a client that
does not keep its connections alive shows up there). ``GET /stats`` returns them as
JSON, ``POST /reset`` zeroes them; neither is counted. ``HookBackend`` is the
coordinator's handle on it.

    python -m loadtest.hookserver --port 8010
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from collections import Counter
from typing import Any

import httptools
import httpx
import orjson

from loadtest.histogram import Histogram
from loadtest.ports import free_port
from loadtest.servers import TargetServer

ANSWERS = {
    b"/connect": b'{"result":"allow"}',
    b"/subscribe": b'{"result":"allow"}',
    b"/publish": b'{"result":"accept"}',
    b"/rpc": b'{"result":"ok","data":null}',
}
UNCOUNTED = (b"/stats", b"/reset", b"/healthz")
NOT_FOUND = b'{"error":"not found"}'


def response(body: bytes, status: bytes = b"200 OK") -> bytes:
    return (
        b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )


CANNED = {path: response(body) for path, body in ANSWERS.items()}


class Stats:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.generation = getattr(self, "generation", 0) + 1
        self.connections = 0  # opened since the reset, and used for a hook request
        self.requests: Counter[str] = Counter()
        self.service: dict[str, Histogram] = {}
        self.service_ns: Counter[str] = Counter()

    def record(self, path: bytes, started_ns: int) -> None:
        elapsed = time.perf_counter_ns() - started_ns
        name = path.decode("latin-1")
        self.requests[name] += 1
        self.service_ns[name] += elapsed
        hist = self.service.get(name)
        if hist is None:
            hist = self.service[name] = Histogram()
        hist.record_us(elapsed // 1000)

    def to_json(self) -> dict[str, Any]:
        return {
            "connections": self.connections,
            "requests": dict(self.requests),
            "service_us": {
                name: {
                    "mean": round(self.service_ns[name] / hist.total / 1000, 1),
                    "p50": hist.percentile_us(0.5),
                    "p99": hist.percentile_us(0.99),
                    "max": hist.max_us,
                }
                for name, hist in self.service.items()
                if hist.total
            },
        }


class HookProtocol(asyncio.Protocol):
    __slots__ = ("generation", "parser", "started_ns", "stats", "transport", "url")

    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.started_ns = 0
        self.generation = 0  # the stats' generation when opened; 0 once counted

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's TCPTransport
        self.generation = self.stats.generation

    def data_received(self, data: bytes) -> None:
        self.started_ns = time.perf_counter_ns()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.write(response(b'{"error":"bad request"}', b"400 Bad Request"))
            self.transport.close()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_complete(self) -> None:
        transport = self.transport
        assert transport is not None
        path = self.url.partition(b"?")[0]
        canned = CANNED.get(path)
        if canned is not None:
            transport.write(canned)
            stats = self.stats
            stats.record(path, self.started_ns)
            if self.generation == stats.generation:
                stats.connections += 1
                self.generation = 0
        elif path == b"/stats":
            transport.write(response(orjson.dumps(self.stats.to_json())))
        elif path == b"/reset":
            self.stats.reset()
            transport.write(response(b"{}"))
        elif path == b"/healthz":
            transport.write(response(b'{"ok":true}'))
        else:
            transport.write(response(NOT_FOUND, b"404 Not Found"))
        if not self.parser.should_keep_alive():
            transport.close()


async def serve(host: str, port: int) -> None:
    stats = Stats()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: HookProtocol(stats), host, port, backlog=4096)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    server.close()


class HookBackend:
    """``python -m loadtest.hookserver`` on the load-generator CPUs."""

    def __init__(self, cpus: list[int] | None) -> None:
        self.port = free_port()
        argv = [sys.executable, "-m", "loadtest.hookserver", "--port", str(self.port)]
        self.server = TargetServer("hook-backend", argv, self.port, cpus=cpus)
        self.http = httpx.AsyncClient(base_url=self.url, timeout=5.0, trust_env=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.server.start()
        await self.server.wait_ready()

    async def reset(self) -> None:
        (await self.http.post("/reset")).raise_for_status()

    async def stats(self) -> dict[str, Any]:
        response = await self.http.get("/stats")
        response.raise_for_status()
        stats: dict[str, Any] = response.json()
        return stats

    async def stop(self) -> None:
        await self.http.aclose()
        self.server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8010)
    args = parser.parse_args(argv)
    import uvloop

    uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
