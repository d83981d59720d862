"""``python -m loadtest connectpath``: the gateway's own cost per connection, with no socket.

``connect`` measures a connection's whole cost to the server process: the kernel's
socket calls, uvloop's transport and the gateway's Python, together, on a machine whose
speed drifts from one hour to the next. This measures the gateway's part alone, stage
by stage, in one process and in its CPU time (what another process takes meanwhile is
not counted): the app (memory broker) with its lifespan run, and
``--cycles`` connections driven through the gateway's own HTTP protocol by a transport
that takes every write and never touches a socket:

- WebSocket: the protocol made (``connection_made``), the upgrade request in (parsed,
  checked, the 101 written, the session started), a subscribe frame in (its reply
  written), a close frame in and the connection lost;
- SSE: the protocol made, the ``GET /sse`` request in (the stream opened and its
  opening written), the connection lost.

One client stays subscribed throughout, so every subscribe joins a channel the worker
already relays (a reconnect); with ``--recover N`` the channel has N publications and
every subscribe resumes from before them (the subscribe's ``since``, the stream's
``last_event_id``), so each connection is also sent those N. Each stage's figure is µs
of the thread's CPU time per connection (less the clock's own cost), median of
``--rounds``; the first cycle of each run is checked (the 101, the reply ``ok``, the
stream's head, the N recovered), so that an error path is never what gets timed.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import os
import secrets
import statistics
import struct
import time
from collections.abc import Callable
from typing import Any

import orjson

STAGES = {
    "ws": ("made", "request_to_101", "subscribe", "close"),
    "sse": ("made", "request_to_stream", "close"),
}


class _Transport:
    """What the gateway's protocols need of an asyncio transport; writes are kept."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closing = False
        self.protocol: Any = None

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def writelines(self, chunks: list[bytes]) -> None:
        self.written.extend(chunks)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 40000)}.get(
            name, default
        )

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol

    def get_protocol(self) -> Any:
        return self.protocol

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None: ...

    def lost(self) -> None:
        """The connection ended: the protocol hears it, and is let go (as uvloop does)."""
        protocol, self.protocol = self.protocol, None
        self.closing = True
        if protocol is not None:
            protocol.connection_lost(None)


def _client_frame(opcode: int, payload: bytes) -> bytes:
    mask = secrets.token_bytes(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    assert len(payload) < 126
    return bytes((0x80 | opcode, 0x80 | len(payload))) + mask + masked


class _Bench:
    def __init__(self, transport: str, secret: str, recover: int = 0) -> None:
        from uvicorn.config import Config
        from uvicorn.lifespan.on import LifespanOn
        from uvicorn.server import ServerState

        from gateway.app import create_app
        from gateway.server.options import uvicorn_options
        from gateway.settings import Settings

        settings = Settings(jwt_secret=secret, demo=False, log_level="warning")
        self.app = create_app(settings)
        self.config = Config(self.app, **uvicorn_options(settings))
        self.config.load()
        self.lifespan = LifespanOn(self.config)
        self.server_state = ServerState()
        self.transport = transport
        self.recover = recover
        self.secret = secret
        from auth.tokens import make_token

        self.token = make_token(secret, "bench", subscribe=["*"], publish=["*"], ttl=3600)
        self._requests()
        self.close = _client_frame(0x8, struct.pack("!H", 1000))
        self.kept: list[_Transport] = []

    def _requests(self, since: tuple[str, int] | None = None) -> None:
        """The request (and the WebSocket's subscribe frame), resuming from ``since``
        (epoch, offset) when given."""
        token = self.token
        resume = ""
        command: dict[str, Any] = {"id": 1, "op": "subscribe", "channel": "bench"}
        if since is not None:
            resume = f"&last_event_id=bench~{since[0]}~{since[1]}"
            command["since"] = {"epoch": since[0], "offset": since[1]}
        if self.transport == "ws":
            key = base64.b64encode(os.urandom(16)).decode()
            self.request = (
                f"GET /ws?token={token} HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        else:
            self.request = (
                f"GET /sse?channel=bench&token={token}{resume} HTTP/1.1\r\n"
                "Host: 127.0.0.1:8000\r\nAccept: text/event-stream\r\n\r\n"
            ).encode()
        self.subscribe = _client_frame(0x1, orjson.dumps(command))

    def _protocol(self) -> tuple[_Transport, Any]:
        transport = _Transport()
        protocol = self.config.http_protocol_class(  # type: ignore[call-arg]
            config=self.config, server_state=self.server_state, app_state=self.lifespan.state
        )
        transport.protocol = protocol
        return transport, protocol

    def _request(self, clock: Callable[[], int]) -> tuple[_Transport, int, int, int]:
        """A new connection and its request: the transport, and the clock before, between
        (the protocol made) and after (the request handled)."""
        t0 = clock()
        transport, protocol = self._protocol()
        protocol.connection_made(transport)
        t1 = clock()
        protocol.data_received(self.request)
        return transport, t0, t1, clock()

    async def ws_cycle(self, clock: Callable[[], int], totals: list[int], check: bool) -> None:
        transport, t0, t1, t2 = self._request(clock)
        upgraded = transport.protocol
        upgraded.data_received(self.subscribe)
        t3 = clock()
        if check:
            _check_ws(transport.written, self.recover)
        await asyncio.sleep(0)  # what the loop would run between the client's frames
        t4 = clock()
        upgraded.data_received(self.close)
        transport.lost()
        t5 = clock()
        await asyncio.sleep(0)
        for i, spent in enumerate((t1 - t0, t2 - t1, t3 - t2, t5 - t4)):
            totals[i] += spent

    async def sse_cycle(self, clock: Callable[[], int], totals: list[int], check: bool) -> None:
        transport, t0, t1, t2 = self._request(clock)
        if check:
            _check_sse(transport.written, self.recover)
        await asyncio.sleep(0)
        t3 = clock()
        transport.lost()
        t4 = clock()
        await asyncio.sleep(0)
        for i, spent in enumerate((t1 - t0, t2 - t1, t4 - t3)):
            totals[i] += spent

    async def keep_one(self) -> None:
        """The client that stays: the channel is live on this worker from here on."""
        transport, protocol = self._protocol()
        protocol.connection_made(transport)
        protocol.data_received(self.request)
        if self.transport == "ws":
            transport.protocol.data_received(self.subscribe)
        await asyncio.sleep(0)
        self.kept.append(transport)
        if self.recover:
            hub = self.app.state.gateway.hub
            first = None
            for n in range(self.recover):
                publication = await hub.publish("bench", orjson.dumps({"n": n, "pad": "x" * 64}))
                first = first or publication
            await asyncio.sleep(0)
            assert first is not None
            self._requests((first.epoch, first.offset - 1))

    async def run(self, cycles: int, rounds: int) -> dict[str, float]:
        await self.lifespan.startup()
        try:
            await self.keep_one()
            cycle = self.ws_cycle if self.transport == "ws" else self.sse_cycle
            clock = time.thread_time_ns  # CPU time: another process's turn is not counted
            stages = STAGES[self.transport]
            scratch = [0] * len(stages)
            for n in range(max(100, cycles // 10)):  # warm-up, the first one checked
                await cycle(clock, scratch, n == 0)
            gc.collect()
            overhead = _clock_overhead(clock)
            per_round: list[list[float]] = []
            for _ in range(rounds):
                totals = [0] * len(stages)
                for _ in range(cycles):
                    await cycle(clock, totals, False)
                per_round.append([(t / cycles - overhead) / 1000 for t in totals])
            medians = {
                stage: round(statistics.median(r[i] for r in per_round), 2)
                for i, stage in enumerate(stages)
            }
            medians["total"] = round(statistics.median(sum(r) for r in per_round), 2)
            return medians
        finally:
            for transport in self.kept:
                transport.lost()
            await asyncio.sleep(0)
            await self.lifespan.shutdown()


def _clock_overhead(clock: Callable[[], int], samples: int = 20_000) -> float:
    """ns that one stage's two readings of ``clock`` add to it (a CPU-time clock is a
    system call, not free): the median gap between two readings with nothing between."""
    gaps = []
    for _ in range(samples):
        start = clock()
        gaps.append(clock() - start)
    return float(statistics.median(gaps))


def _check_ws(written: list[bytes], recovered: int = 0) -> None:
    head = written[0] if written else b""
    if not head.startswith(b"HTTP/1.1 101 "):
        raise RuntimeError(f"connectpath: the upgrade was not accepted: {head[:200]!r}")
    replies = b"".join(written[1:]).replace(b" ", b"")
    if b'"ok":true' not in replies:
        raise RuntimeError(f"connectpath: the subscribe was not answered ok: {replies[:200]!r}")
    _check_recovered(replies, recovered, b'"recovered":true')


def _check_sse(written: list[bytes], recovered: int = 0) -> None:
    head = b"".join(written)
    if not head.startswith(b"HTTP/1.1 200 ") or b"text/event-stream" not in head:
        raise RuntimeError(f"connectpath: the stream did not open: {head[:200]!r}")
    _check_recovered(head.replace(b" ", b""), recovered)


def _check_recovered(written: bytes, count: int, told: bytes = b"") -> None:
    """With ``--recover``: the client was sent the channel's ``count`` publications, and
    the subscribe's reply said so (``told``)."""
    if count and (told not in written or written.count(b'"channel":"bench"') < count):
        raise RuntimeError(f"connectpath: {count} publications were not recovered: {written!r}")


def run_connectpath(*, cycles: int, rounds: int, recover: int = 0) -> dict[str, Any]:
    """µs per connection, stage by stage, for each transport (each in a fresh event loop)."""
    try:
        import uvloop

        runner: Callable[[Any], Any] = uvloop.run
    except ImportError:  # pragma: no cover - uvicorn[standard] brings it
        runner = asyncio.run
    secret = secrets.token_hex(32)
    return {
        "cycles": cycles,
        "rounds": rounds,
        "recover": recover,
        "us_per_connection": {
            transport: runner(_Bench(transport, secret, recover).run(cycles, rounds))
            for transport in STAGES
        },
    }


def summary(report: dict[str, Any]) -> str:
    lines = [
        f"connectpath: {report['cycles']:,} connections x {report['rounds']} rounds through the "
        "gateway's protocols, no socket (µs per connection, median round)"
        + (f", each recovering {report['recover']} publications" if report.get("recover") else "")
    ]
    for transport, stages in report["us_per_connection"].items():
        parts = "  ".join(f"{stage} {us:.1f}" for stage, us in stages.items())
        lines.append(f"  {transport:<4} {parts}")
    return "\n".join(lines)


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "connectpath",
        help="the gateway's own cost per connection, stage by stage, with no socket",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("--cycles", type=int, default=5000, help="connections per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--recover",
        type=int,
        default=0,
        metavar="N",
        help="every connection resumes from before the channel's N publications",
    )
    p.add_argument("--json", action="store_true", help="print the JSON report on stdout")
