"""Clients of real gateway workers through a Redis failure, and what they saw.

``run(scenario)`` starts a topology (tests/redis_topologies.py), two gateway processes on
it, WebSocket clients subscribed to a few channels on both (raw: they count what the
gateway sent, repeats included), and one publisher per channel through the HTTP API
(gatewayclient's ``Publisher``); after ``before`` seconds it breaks the topology:

* ``sentinel``: SIGKILL the master; the Sentinels promote the replica;
* ``cluster``: SIGKILL the master of the first channel's slot; its replica takes over;
* ``shard``: SIGKILL the second of two shards, and start it again (empty) ``outage``
  seconds later.

It keeps publishing until every channel accepts publications again and ``after`` seconds
more, waits for the clients to receive everything accepted, and counts, per client and
channel: publications delivered, duplicates (one position twice), silent gaps (a missing
offset inside one epoch), epochs announced (a change of epoch is how a WebSocket client
learns of a gap), accepted publications lost in an announced gap, and how long until
publishing and delivery resumed.

Used small by tests/test_failover_clients.py (which asserts no duplicates and no silent
gaps) and at size by ``scripts/failover.py`` (the figures in docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from gatewayclient import GatewayError, Publisher
from tests.conftest import SECRET, token
from tests.helpers import poll
from tests.procs import GatewayProcess
from tests.redis_topologies import RedisClusterSetup, RedisSentinelSetup, RedisShards

SCENARIOS = ("sentinel", "cluster", "shard")
# Channel names, fixed so that each scenario knows where they live: on a Cluster of three
# masters "doomed" is on the second, "kept" on the first and "moving" on the third.
CHANNELS = ("doomed", "kept", "moving", "other")


@dataclass
class Accepted:
    at: float  # when the publish was answered
    channel: str
    epoch: str
    offset: int
    sent: float  # when it was sent: a publish sent after the break is delivered after it


@dataclass
class Client:
    """One WebSocket client's pushes: (time received, channel, epoch, offset)."""

    conn: ClientConnection
    pushes: list[tuple[float, str, str, int]] = field(default_factory=list)

    async def read(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for frame in self.conn:
                message = orjson.loads(frame)
                if "offset" in message and "id" not in message:
                    self.pushes.append(
                        (time.monotonic(), message["channel"], message["epoch"], message["offset"])
                    )


@dataclass
class Outcome:
    scenario: str
    clients: int
    accepted: int = 0
    refused: int = 0
    delivered: int = 0
    duplicates: int = 0
    silent_gaps: int = 0
    epochs_announced: int = 0
    lost_in_announced_gaps: int = 0
    failover_s: float = 0.0  # the topology's own: until Redis served again
    publish_resumed_s: float = 0.0
    delivery_resumed_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        return {k: round(v, 2) if isinstance(v, float) else v for k, v in vars(self).items()}


def gateway_env(url: str, prefix: str) -> dict[str, str]:
    return {
        "GATEWAY_BROKER_URL": url,
        "GATEWAY_BROKER_PREFIX": prefix,
        "GATEWAY_JWT_SECRET": SECRET,
        "GATEWAY_LOG_LEVEL": "warning",
    }


@contextlib.asynccontextmanager
async def topology(scenario: str) -> AsyncIterator[Any]:
    setups: dict[str, Callable[[], Any]] = {
        "sentinel": lambda: RedisSentinelSetup().start(),
        "cluster": lambda: RedisClusterSetup().start(),
        "shard": lambda: RedisShards(2).start(),
    }
    setup = await asyncio.to_thread(setups[scenario])
    try:
        yield setup
    finally:
        setup.close()


async def publisher(
    api: Publisher,
    channel: str,
    rate: float,
    stop: asyncio.Event,
    accepted: list[Accepted],
    refused: list[float],
) -> None:
    n = 0
    while not stop.is_set():
        n += 1
        started = time.monotonic()
        try:
            sent = await api.publish(channel, n)
        except (GatewayError, httpx.HTTPError):
            refused.append(time.monotonic())
        else:
            answered = time.monotonic()
            accepted.append(Accepted(answered, channel, sent.epoch, sent.offset, started))
        await asyncio.sleep(1 / rate)


async def break_topology(scenario: str, setup: Any, prefix: str, outage: float) -> float:
    """Break it; the seconds until the topology itself served again."""
    if scenario == "sentinel":
        await asyncio.to_thread(setup.kill_master)
        return float(setup.failover_seconds)
    if scenario == "cluster":
        slot = setup.slot_of(f"{prefix}:t:{{{CHANNELS[0]}}}")
        _, seconds = await asyncio.to_thread(setup.kill_master_of_slot, slot)
        return float(seconds)
    server = setup.servers[1]
    started = time.monotonic()
    await asyncio.to_thread(server.stop)
    await asyncio.sleep(outage)
    await asyncio.to_thread(server.start)
    return time.monotonic() - started


def analyse(
    outcome: Outcome, clients: list[Client], accepted: list[Accepted], broke_at: float
) -> None:
    outcome.accepted = len(accepted)
    # When each was sent: one sent before the break and answered after it may have
    # reached the clients before the break.
    published = {(a.channel, a.epoch, a.offset): a.sent for a in accepted}
    waits: list[float] = []
    for client in clients:
        outcome.delivered += len(client.pushes)
        seen: set[tuple[str, str, int]] = set()
        last: dict[str, tuple[str, int]] = {}
        back: dict[str, float] = {}  # channel -> first push sent after the break
        silent = 0
        for at, channel, epoch, offset in client.pushes:
            key = (channel, epoch, offset)
            if key in seen:
                outcome.duplicates += 1
                continue
            seen.add(key)
            before = last.get(channel)
            if before is not None and before[0] == epoch and offset != before[1] + 1:
                silent += max(0, offset - before[1] - 1)
            if before is not None and before[0] != epoch:
                outcome.epochs_announced += 1
            last[channel] = (epoch, offset)
            if channel not in back and published.get(key, 0.0) > broke_at:
                back[channel] = at
        outcome.silent_gaps += silent
        # What was accepted and never arrived, less the silent gaps: ended with its epoch.
        outcome.lost_in_announced_gaps += len(published.keys() - seen) - silent
        if len(back) == len(CHANNELS):
            waits.append(max(back.values()) - broke_at)
    outcome.delivery_resumed_s = max(waits) if len(waits) == len(clients) else -1.0


async def run(
    scenario: str,
    *,
    clients: int = 10,
    rate: float = 20.0,
    before: float = 2.0,
    after: float = 2.0,
    outage: float = 3.0,
    timeout: float = 60.0,
) -> Outcome:
    """One scenario end to end (see the module docstring); ``rate`` per channel."""
    outcome = Outcome(scenario, clients)
    prefix = f"failover-{secrets.token_hex(4)}"
    async with topology(scenario) as setup:
        procs = [GatewayProcess(gateway_env(setup.url, prefix)) for _ in range(2)]
        try:
            await asyncio.gather(*(proc.wait_ready() for proc in procs))
            await watch(
                outcome, setup, procs, prefix, clients, rate, before, after, outage, timeout
            )
        finally:
            for proc in procs:
                proc.stop()
    return outcome


async def watch(
    outcome: Outcome,
    setup: Any,
    procs: list[GatewayProcess],
    prefix: str,
    clients: int,
    rate: float,
    before: float,
    after: float,
    outage: float,
    timeout: float,
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        watchers: list[Client] = []
        for n in range(clients):
            proc = procs[n % len(procs)]
            url = f"{proc.ws_url}/ws?token={token(f'viewer-{n}')}"
            conn = await stack.enter_async_context(connect(url, proxy=None, max_size=None))
            for i, channel in enumerate(CHANNELS):
                command = {"id": i + 1, "op": "subscribe", "channel": channel}
                await conn.send(orjson.dumps(command).decode())
            watchers.append(Client(conn))
        readers = [asyncio.create_task(client.read()) for client in watchers]
        http = await stack.enter_async_context(httpx.AsyncClient(trust_env=False, timeout=5.0))
        api = Publisher(procs[0].url, token("publisher"), http=http)
        stop = asyncio.Event()
        accepted: list[Accepted] = []
        refused: list[float] = []
        publishers = [
            asyncio.create_task(publisher(api, channel, rate, stop, accepted, refused))
            for channel in CHANNELS
        ]
        await asyncio.sleep(before)
        broke_at = time.monotonic()
        outcome.failover_s = await break_topology(outcome.scenario, setup, prefix, outage)
        deadline = broke_at + timeout
        while time.monotonic() < deadline:
            recent = {a.channel for a in accepted if a.at > broke_at + outcome.failover_s}
            if recent == set(CHANNELS):
                break
            await asyncio.sleep(0.05)
        else:
            outcome.notes.append("publishing did not resume on every channel")
        failed = [t for t in refused if t > broke_at]
        resumed = [a.at for a in accepted if a.at > (max(failed) if failed else broke_at)]
        outcome.publish_resumed_s = (min(resumed) - broke_at) if failed and resumed else 0.0
        await asyncio.sleep(after)
        stop.set()
        await asyncio.gather(*publishers)
        outcome.refused = len(refused)
        last = {a.channel: (a.epoch, a.offset) for a in accepted}

        def caught_up(client: Client) -> bool:
            got = {(c, e, o) for _, c, e, o in client.pushes}
            return all((c, e, o) in got for c, (e, o) in last.items())

        async def all_caught_up() -> bool:
            return all(caught_up(c) for c in watchers)

        with contextlib.suppress(AssertionError):  # what never arrives is counted below
            await poll(all_caught_up, timeout=10)
        for task in readers:
            task.cancel()
        analyse(outcome, watchers, accepted, broke_at)
