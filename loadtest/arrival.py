"""``python -m loadtest arrival``: every client of a worker arriving in the same instant.

A load balancer's reload or a lost pod sends a worker its clients within milliseconds,
at the speed of the proxy's C, faster than any Python load generator that speaks the
protocol (``storm`` reconnects its clients at the pace its own loop allows). Here one
process (pinned to ``--loadgen-cpus``) opens ``--clients`` raw sockets in a plain loop,
each sending its request at once: a WebSocket upgrade, or an
SSE ``GET /sse?channel=``; a WebSocket sends its subscribe frame once the 101 is in.
All to one channel, or each to one of its own (``--distinct-channels``: per-user
channels, each new to the worker), with the memory broker or a Redis server
(``--broker redis``, on the load generator's CPUs).
Then it reads until every client is subscribed (the subscribe's ``ok`` reply; the
stream's 200 head) or ``--timeout`` passes.

A worker busy with the handshakes already accepted does not accept meanwhile; what
arrives waits in the kernel's listen queue, and past its length each SYN is dropped
and that client's kernel retries 1 s later, then 3 s, 7 s. The report gives, for each
``--backlogs`` value (``GATEWAY_LISTEN_BACKLOG``, a fresh gateway each, on
``--server-cpus``), the time from the first connect until each client was subscribed
(p50, p95, p99, max), how many were, the gateway's CPU per client meanwhile, and the
SYNs the machine's kernel dropped for full
listen queues meanwhile (``ListenOverflows`` of /proc/net/netstat, counted machine-wide:
run it on a quiet machine). The kernel caps a backlog at ``net.core.somaxconn``.
"""

from __future__ import annotations

import asyncio
import os
import select
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any

import orjson

from auth.tokens import make_token
from loadtest.ports import free_port
from loadtest.procstat import exact_cpu_seconds
from loadtest.servers import RedisServer, gateway_server, new_secret

CHANNEL = "arrival"
EINPROGRESS = 115


def listen_overflows() -> int:
    """The kernel's count of SYNs dropped for a full listen queue (machine-wide)."""
    with open("/proc/net/netstat") as f:
        lines = f.read().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            return int(dict(zip(names.split(), values.split(), strict=True))["ListenOverflows"])
    return 0


def masked_text(payload: bytes) -> bytes:
    """A client's text frame (RFC 6455: masked), for payloads under 126 bytes."""
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return struct.pack("!BB", 0x81, 0x80 | len(payload)) + mask + masked


def request(transport: str, token: str, channel: str) -> tuple[bytes, bytes, bytes]:
    """What a client sends at once; what it sends once the head of the answer is in (a
    WebSocket client waits for the 101, RFC 6455 section 4.1); and what says it is
    subscribed."""
    if transport == "sse":
        head = f"GET /sse?channel={channel}&token={token} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        return head.encode(), b"", b"HTTP/1.1 200 "
    head = (
        f"GET /ws?token={token} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    )
    subscribe = orjson.dumps({"id": 1, "op": "subscribe", "channel": channel})
    return head.encode(), masked_text(subscribe), b'{"id":1,"ok":true'


def arrive(port: int, requests: list[tuple[bytes, bytes, bytes]], timeout: float) -> list[float]:
    """Open a connection for each of ``requests`` in one loop, each sending its request
    (as ``request`` makes it); the seconds from the first connect until each was
    subscribed (those that were)."""
    poller = select.epoll()
    socks: dict[int, tuple[socket.socket, bytearray]] = {}
    sends: dict[int, tuple[bytes, bytes, bytes]] = {}
    unsent: set[int] = set()
    started = time.monotonic()
    for sent in requests:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        if sock.connect_ex(("127.0.0.1", port)) not in (0, EINPROGRESS):
            sock.close()
            continue
        fd = sock.fileno()
        socks[fd], sends[fd] = (sock, bytearray()), sent
        try:  # sent at once, as a proxy forwards it: established already on loopback
            sock.send(sent[0])  # when its SYN was queued (small: one segment)
            poller.register(fd, select.EPOLLIN)
        except OSError:  # not yet (its SYN dropped): once writable
            unsent.add(fd)
            poller.register(fd, select.EPOLLOUT)
    headless = {fd for fd in socks if sends[fd][1]}  # waiting for the answer's head
    times: list[float] = []
    deadline = started + timeout
    while socks and time.monotonic() < deadline:
        for fd, events in poller.poll(0.2):
            sock, got = socks[fd]
            _, then, subscribed = sends[fd]
            if fd in unsent:
                unsent.discard(fd)
                if events & (select.EPOLLERR | select.EPOLLHUP):
                    data = b""
                else:
                    sock.send(sends[fd][0])
                    poller.modify(fd, select.EPOLLIN)
                    continue
            else:
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                got += data
                if fd in headless and b"\r\n\r\n" in got:
                    headless.discard(fd)
                    sock.send(then)
                if data and subscribed not in got:
                    continue
                if data:
                    times.append(time.monotonic() - started)
            poller.unregister(fd)
            del socks[fd]
            sock.close()
    for sock, _ in socks.values():
        sock.close()
    poller.close()
    return times


def percentile(values: list[float], share: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(len(values) * share))] * 1e3, 1)


@dataclass(frozen=True)
class Crowd:
    """What arrives, and at what."""

    clients: int
    transport: str
    distinct_channels: bool  # a channel of its own for each client (per-user channels)
    broker: str  # memory, redis
    timeout: float
    server_cpus: list[int] | None
    loadgen_cpus: list[int] | None
    presence: bool = False  # presence (join/leave) on the crowd's channels, as chat rooms

    def requests(self, token: str) -> list[tuple[bytes, bytes, bytes]]:
        if not self.distinct_channels:
            return [request(self.transport, token, CHANNEL)] * self.clients
        return [request(self.transport, token, f"{CHANNEL}:{n}") for n in range(self.clients)]


async def one_run(crowd: Crowd, backlog: int) -> dict[str, Any]:
    secret = new_secret()
    port = free_port()
    redis = RedisServer(crowd.loadgen_cpus) if crowd.broker == "redis" else None
    server = None
    try:
        if redis is not None:
            redis.start()
            await redis.wait_ready()
        server = gateway_server(
            port,
            broker_url=redis.url if redis is not None else "memory://",
            secret=secret,
            cpus=crowd.server_cpus,
            extra_env={
                "GATEWAY_LISTEN_BACKLOG": str(backlog),
                "GATEWAY_ACCESS_LOG": "false",
                # (default chat:*: none of the crowd's channels)
                **({"GATEWAY_PRESENCE_CHANNELS": f"{CHANNEL}*"} if crowd.presence else {}),
            },
        )
        server.start()
        await server.wait_ready()
        token = make_token(secret, "arrival", subscribe=[CHANNEL, f"{CHANNEL}:*"], ttl=3600)
        requests = crowd.requests(token)
        dropped, cpu = listen_overflows(), exact_cpu_seconds(server.pid)
        times = await asyncio.to_thread(arrive, port, requests, crowd.timeout)
        cpu = exact_cpu_seconds(server.pid) - cpu
        dropped = listen_overflows() - dropped
    finally:
        for process in (server, redis):
            if process is not None:
                process.stop()
    return {
        "backlog": backlog,
        "subscribed": len(times),
        "syns_dropped": dropped,
        # the gateway's CPU from the first connect until the last client was subscribed
        "server_cpu_us_per_client": round(cpu / crowd.clients * 1e6, 1),
        "subscribed_ms": {
            "p50": percentile(times, 0.5),
            "p95": percentile(times, 0.95),
            "p99": percentile(times, 0.99),
            "max": percentile(times, 1.0),
        },
    }


def run_arrival(crowd: Crowd, backlogs: list[int]) -> dict[str, Any]:
    if crowd.loadgen_cpus:
        os.sched_setaffinity(0, crowd.loadgen_cpus)
    runs = [asyncio.run(one_run(crowd, backlog)) for backlog in backlogs]
    with open("/proc/sys/net/core/somaxconn") as f:
        somaxconn = int(f.read())
    return {
        "scenario": "arrival",
        "clients": crowd.clients,
        "transport": crowd.transport,
        "distinct_channels": crowd.distinct_channels,
        "broker": crowd.broker,
        "presence": crowd.presence,
        "somaxconn": somaxconn,
        "server_cpus": crowd.server_cpus,
        "loadgen_cpus": crowd.loadgen_cpus,
        "runs": runs,
    }


def summary(report: dict[str, Any]) -> str:
    lines = [
        f"arrival: {report['clients']:,} {report['transport']} clients at once on one worker, "
        f"{'a channel each' if report['distinct_channels'] else 'one channel'}, "
        f"{'with presence, ' if report.get('presence') else ''}"
        f"{report['broker']} broker (net.core.somaxconn {report['somaxconn']})"
    ]
    for run in report["runs"]:
        ms = run["subscribed_ms"]
        lines.append(
            f"  backlog {run['backlog']:>6}: {run['subscribed']:,} subscribed, p50 {ms['p50']} "
            f"p95 {ms['p95']} p99 {ms['p99']} max {ms['max']} ms; "
            f"{run['syns_dropped']:,} SYNs dropped; server CPU "
            f"{run['server_cpu_us_per_client']} µs a client"
        )
    return "\n".join(lines)


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "arrival",
        help="every client of a worker arriving at once: time until subscribed, SYNs dropped",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("--clients", type=int, default=6000)
    p.add_argument("--transport", choices=["ws", "sse"], default="ws")
    p.add_argument(
        "--distinct-channels",
        action="store_true",
        help="a channel of its own for each client (per-user channels), not one for all",
    )
    p.add_argument("--broker", choices=["memory", "redis"], default="memory")
    p.add_argument(
        "--presence",
        action="store_true",
        help="presence on the crowd's channels (a join each, announced): chat rooms; "
        "with --distinct-channels, rooms of one",
    )
    p.add_argument(
        "--backlogs",
        default="2048,65535",
        help="GATEWAY_LISTEN_BACKLOG values, a run each (2048: uvicorn's default)",
    )
    p.add_argument("--timeout", type=float, default=30.0, help="s to wait for every client")
    p.add_argument("--server-cpus", default="0", help="e.g. 0; empty: not pinned")
    p.add_argument("--loadgen-cpus", default="1", help="e.g. 1; empty: not pinned")
    p.add_argument("--json", action="store_true", help="print the JSON report on stdout")
