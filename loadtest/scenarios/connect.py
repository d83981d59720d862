"""``connect``: what a client's arrival costs the server, in CPU time.

``--clients`` clients connect (at ``--connect-rate``, as fast as the server takes them)
and subscribe to one channel; then they all close. The server's CPU time (from /proc)
is read before, once every client is subscribed and the server is quiet again, and once
they are all gone and it is quiet again: the report gives µs of server CPU per connect +
subscribe, per close, and per whole cycle. With ``--recover K`` (the gateway only) K
publications are made first and every client subscribes from K publications before the
top (a WebSocket ``since``, an SSE cursor): each subscribe then includes a
K-publication recovery, as after a reconnect. With ``--distinct-tokens`` every client
has a token of its own (the gateway remembers tokens it verified: one token for all
measures a reconnect to the same worker, distinct ones a first connect). With
``--distinct-channels`` every client subscribes to a channel of its own, which the
server does not relay yet (a per-user channel, a fresh worker): each subscribe waits for
the broker. With ``--instructions`` the server runs under callgrind and the report adds
its user-space instructions per connect, close and cycle (``loadtest.callgrind``):
figures that stay the same on a busy machine, where CPU time does not.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any
from urllib.parse import quote

import httpx
import orjson

from loadtest import callgrind
from loadtest.config import Setup
from loadtest.dialects import Dialect, GatewaySse, GatewayWs
from loadtest.harness import Harness
from loadtest.procstat import exact_cpu_seconds
from loadtest.recorder import Recorder
from loadtest.scenarios.common import finish_report, save
from loadtest.scenarios.idle import WARMUP_CONNECTIONS, coordinator_plan, warm_up
from loadtest.worker import ConnSpec, open_connection

QUIET_CPU_SHARE = 0.05  # the server counts as quiet below this share of a core
QUIET_WINDOW = 0.3
QUIET_MAX_WAIT = 30.0


class RecoveringWs(GatewayWs):
    def __init__(self, since: dict[str, Any]) -> None:
        self.since = since

    def hello(self, channel: str) -> list[bytes]:
        command = {"id": 1, "op": "subscribe", "channel": channel, "since": self.since}
        return [orjson.dumps(command)]


class RecoveringSse(GatewaySse):
    def __init__(self, cursor: str) -> None:
        self.cursor = cursor

    def path(self, channel: str, token: str) -> str:
        return f"{super().path(channel, token)}&last_event_id={quote(self.cursor)}"


async def quiet_cpu(pid: int) -> float:
    """The server's CPU seconds once it has been quiet for a moment."""
    deadline = time.monotonic() + QUIET_MAX_WAIT
    before = exact_cpu_seconds(pid)
    while True:
        await asyncio.sleep(QUIET_WINDOW)
        now = exact_cpu_seconds(pid)
        if now - before < QUIET_CPU_SHARE * QUIET_WINDOW or time.monotonic() > deadline:
            return now
        before = now


async def publish_history(h: Harness, channel: str, count: int) -> dict[str, Any]:
    """Publish ``count`` publications; the position ``count`` before the top."""
    headers = {"Authorization": f"Bearer {h.token}"}
    async with httpx.AsyncClient(base_url=h.base_url, trust_env=False) as http:
        last: dict[str, Any] = {}
        for n in range(count):
            body = {"channel": channel, "data": {"history": n}}
            r = await http.post("/api/publish", json=body, headers=headers)
            r.raise_for_status()
            last = r.json()
    return {"offset": last["offset"] - count, "epoch": last["epoch"]}


def recovering(dialect: Dialect, channel: str, since: dict[str, Any]) -> Dialect:
    if isinstance(dialect, GatewayWs):
        return RecoveringWs(since)
    cursor = f"{channel}~{since['epoch']}~{since['offset']}"
    return RecoveringSse(cursor)


async def anchor(h: Harness, channel: str) -> Any:
    """One client subscribed to ``channel`` from the coordinator: the worker relays it."""
    plan = coordinator_plan(h)
    client, _ = await open_connection(plan, ConnSpec(channel), Recorder(1, h.t0))
    return client


async def run_connect(
    setup: Setup,
    *,
    clients: int,
    recover: int,
    distinct_tokens: bool = False,
    live_channel: bool = False,
    distinct_channels: bool = False,
    instructions: bool = False,
) -> dict[str, Any]:
    if distinct_channels and live_channel:
        raise SystemExit(
            "--distinct-channels: each client's channel is new (no --live-channel, --recover)"
        )
    config = {
        "clients": clients,
        "recover": recover,
        "distinct_tokens": distinct_tokens,
        "live_channel": live_channel,
        "distinct_channels": distinct_channels,
        "instructions": instructions,
    }
    out = None
    if instructions:
        setup, out = callgrind.prepare(setup)
    return await _connect(setup, config, out)


async def _connect(setup: Setup, config: dict[str, Any], out: str | None) -> dict[str, Any]:
    clients, recover = config["clients"], config["recover"]
    distinct_tokens, live_channel = config["distinct_tokens"], config["live_channel"]
    async with Harness(setup, "connect") as h:
        if h.server_sampler is None:
            raise SystemExit("connect needs the server's pid (a local server, or --server-pid)")
        pid = h.server_sampler.pid
        if recover and h.target.name != "gateway":
            raise SystemExit("--recover is for the gateway (the baselines have no history)")
        channel = h.channel()
        await warm_up(h, WARMUP_CONNECTIONS)
        held = await anchor(h, channel) if live_channel else None
        if recover:
            since = await publish_history(h, channel, recover)
            h.dialect = recovering(h.dialect, channel, since)
        h.status = lambda: ("settling", None, "")
        if config["distinct_channels"]:
            specs = h.specs([f"{channel}-{n}" for n in range(clients)], slow_share=0)
        else:
            specs = h.specs([channel] * clients, slow_share=0)
        if distinct_tokens:
            for n, spec in enumerate(specs):
                spec.token = h.client_token(n)
        counter = callgrind.Counter(pid, out) if out else None
        start = await quiet_cpu(pid)
        if counter is not None:
            await counter.start()
        began = time.time()
        connect = await h.connect(specs, n_steps=1)
        h.status = lambda: ("settling", None, "")
        connected = await quiet_cpu(pid)
        subscribed_in = time.time() - began
        counted = [await counter.phase()] if counter is not None else []
        report, merged = await finish_report(h, "connect", config, clients, connect, [], None)
        closed = await quiet_cpu(pid)
        if counter is not None:
            counted.append(await counter.phase())
            await counter.stop()
        if held is not None:
            held.close()
        ok = max(1, merged.connect_hist.total)

        def us(seconds: float) -> float:
            return round(seconds / ok * 1e6, 1)

        report["connect"] = {
            "clients": ok,
            "recover": recover,
            "distinct_tokens": distinct_tokens,
            "live_channel": live_channel,
            "distinct_channels": config["distinct_channels"],
            "subscribed_in_s": round(subscribed_in, 2),
            "server_cpu_us_per_connect": us(connected - start),
            "server_cpu_us_per_close": us(closed - connected),
            "server_cpu_us_per_cycle": us(closed - start),
        }
        if counted:
            connects, closes = (round(n / ok / 1000, 1) for n in counted)
            report["connect"].update(
                server_kinstructions_per_connect=connects,
                server_kinstructions_per_close=closes,
                server_kinstructions_per_cycle=round(connects + closes, 1),
            )
        return save(h, "connect", report)
