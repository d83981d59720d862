"""The reconnect storm, on the client side.

Every connection of a worker is cut at the same instant by a TCP reset (what a load
balancer reload or a crashed pod does to them), and every client comes straight back,
resuming its channel from the last offset it received, as ``client.js`` does: a
subscribe with ``since``. The connection's ``ConnState`` carries on across the cut, so
the recorder's checks (every ``seq`` once, in order) span it; the worker reports how
long each client took to be subscribed again and what the gateway said about its
recovery.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections import Counter
from typing import Any, Protocol

import orjson

from loadtest.clients import WsClient, connect_ws
from loadtest.dialects import READY, Event, Failed, GatewayWs, loads
from loadtest.histogram import Histogram
from loadtest.recorder import Recorder


class Reach(Protocol):
    """Where the clients connect (a ``WorkerPlan``)."""

    host: str
    port: int
    token: str
    connect_timeout: float


RETRY_DELAYS = (0.05, 0.1, 0.2, 0.4, 0.8, 1.0)  # then 1 s until ``GIVE_UP``
GIVE_UP = 60.0


class ResumingWs(GatewayWs):
    """The gateway's dialect for one connection: it remembers the last position it
    received and resubscribes from there."""

    def __init__(self) -> None:
        self.position: dict[str, Any] | None = None
        self.recovered: bool | None = None

    def per_connection(self) -> ResumingWs:
        return ResumingWs()

    def hello(self, channel: str) -> list[bytes]:
        command: dict[str, Any] = {"id": 1, "op": "subscribe", "channel": channel}
        if self.position is not None:
            command["since"] = self.position
        return [orjson.dumps(command)]

    def parse(self, data: bytes, channel: str) -> Event:
        message = loads(data)
        payload = message.get("data")
        if type(payload) is dict:
            self.position = {"offset": message["offset"], "epoch": message["epoch"]}
            return payload
        if "id" in message:
            if not message.get("ok"):
                return Failed(str(message.get("error")))
            result = message["result"]
            if self.position is None:  # a first subscribe: from the top it answered
                self.position = {"offset": result["offset"], "epoch": result["epoch"]}
            else:
                self.recovered = bool(result.get("recovered"))
            return READY
        return None


def reset(client: WsClient) -> None:
    """Cut ``client``'s connection with a TCP reset, not a close handshake."""
    client.closing = True  # the recorder counts it as ours, not as a server close
    if client.transport is None:
        return
    transport = client.transport.underlying_transport
    with contextlib.suppress(OSError, AttributeError):
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


async def storm(
    plan: Reach, recorder: Recorder, connected: list[Any], at: float
) -> tuple[dict[str, Any], list[WsClient]]:
    """At wall-clock time ``at``, cut every connection of ``connected`` (a worker's, as
    its ``WorkerPlan`` says to reach the server) and bring each back, resuming: the
    figures, and the clients back."""
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, at - time.time()))
    clients = [c for c in connected if isinstance(c, WsClient)]
    returned: list[WsClient] = []
    cut = loop.time()
    for client in clients:
        reset(client)
    back = Histogram()
    failures: Counter[str] = Counter()
    recovered: Counter[str] = Counter()

    async def come_back(old: WsClient) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(old.disconnected), 5)
        conn = old.conn
        conn.ready = False  # a failed attempt must not take its deliveries off the count
        for attempt in range(1_000_000):
            if loop.time() - cut > GIVE_UP:
                failures["gave up"] += 1
                return
            try:
                client = await connect_ws(
                    old.dialect, plan.host, plan.port, plan.token, conn, recorder,
                    timeout=plan.connect_timeout,
                )  # fmt: skip
                break
            except Exception as exc:  # a real client retries with a backoff
                failures[type(exc).__name__] += 1
                conn.closed = False
                await asyncio.sleep(RETRY_DELAYS[min(attempt, len(RETRY_DELAYS) - 1)])
        back.record_us(int((loop.time() - cut) * 1e6))
        conn.closed, conn.close_code = False, None
        recorder.alive_by_channel[conn.channel] -= 1  # on_ready counted it once more
        assert isinstance(old.dialect, ResumingWs)
        recovered[str(old.dialect.recovered).lower()] += 1
        returned.append(client)

    await asyncio.gather(*(come_back(client) for client in clients))
    figures = {
        "clients": len(clients),
        "back": back.to_state(),
        "failures": dict(failures),
        "recovered": dict(recovered),
    }
    return figures, returned
