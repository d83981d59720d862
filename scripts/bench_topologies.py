"""Publications through the broker on each Redis topology, and what each Redis process
spends per publication: one Redis (single publishes, and ``publish_many`` batches), a
Sentinel master with its replica, two and three shards, a three-master Redis Cluster
(with a replica each).

    .venv/bin/python scripts/bench_topologies.py [--rate 2000] [--seconds 10] [--channels 300]

Each topology is started on free ports (tests/redis_topologies.py). One broker (a
worker) subscribes to every channel, then publishes to them in turn at ``--rate``
publications/s in total, the same for every topology, for ``--seconds``; then as fast as
50 concurrent publishers go. Redis CPU is ``used_cpu_user + used_cpu_sys`` of ``INFO
cpu`` on each master before and after, less what it spends idle (measured over a quiet
second before), divided by the publications of the run: the
busiest master's share against one Redis's shows whether capacity grows with masters,
even where two cores cannot show it as publications/s. Prints Markdown rows.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from channels.backend_url import create_backend
from channels.broker import Broker, BrokerOptions
from channels.publication import Message
from tests.redis_server import RedisServer
from tests.redis_topologies import RedisClusterSetup, RedisSentinelSetup, RedisShards, query

PAYLOAD = b'{"symbol":"ACME","price":101.25,"ts":1700000000.123}'
CONCURRENCY = 50


def cpu(servers: list[RedisServer]) -> list[float]:
    seconds = []
    for server in servers:
        info = query(server.port, "INFO", "cpu")
        seconds.append(float(info["used_cpu_user"]) + float(info["used_cpu_sys"]))
    return seconds


class Topology:
    def __init__(self, name: str, start: Callable[[], Any], batch: int = 1) -> None:
        self.name, self.start, self.batch = name, start, batch


def masters(setup: Any) -> list[RedisServer]:
    if isinstance(setup, RedisClusterSetup):
        return setup.masters()
    if isinstance(setup, RedisShards):
        return list(setup.servers)
    if isinstance(setup, RedisSentinelSetup):
        return [setup.master()]
    return [setup]


async def send(broker: Broker, channel: str, batch: int) -> None:
    """One publication, or ``batch`` of them in one ``publish_many``."""
    if batch == 1:
        await broker.publish(channel, PAYLOAD)
    else:
        await broker.publish_many(channel, [PAYLOAD] * batch)


async def paced(
    broker: Broker, channels: list[str], rate: float, seconds: float, batch: int
) -> int:
    """Publish to ``channels`` in turn at ``rate`` publications/s; the count published."""
    started, sent, n = time.perf_counter(), 0, 0
    pending: set[asyncio.Task[Any]] = set()
    total = int(rate * seconds)
    room = asyncio.Semaphore(CONCURRENCY)

    async def one(channel: str) -> None:
        try:
            await send(broker, channel, batch)
        finally:
            room.release()

    while sent < total:
        due = started + sent / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        channel = channels[n % len(channels)]
        n += 1
        await room.acquire()  # at most CONCURRENCY in flight: a late machine catches up
        task = asyncio.create_task(one(channel))
        pending.add(task)
        task.add_done_callback(pending.discard)
        sent += batch
    await asyncio.gather(*pending)
    return sent


async def flat_out(broker: Broker, channels: list[str], count: int, batch: int) -> float:
    """``count`` publications by ``CONCURRENCY`` publishers; publications/s."""
    per_worker = count // CONCURRENCY // batch

    async def publisher(k: int) -> None:
        for n in range(per_worker):
            channel = channels[(k * per_worker + n) % len(channels)]
            await send(broker, channel, batch)

    started = time.perf_counter()
    await asyncio.gather(*(publisher(k) for k in range(CONCURRENCY)))
    return per_worker * CONCURRENCY * batch / (time.perf_counter() - started)


async def measure(topology: Topology, args: argparse.Namespace) -> str:
    setup = await asyncio.to_thread(topology.start)
    try:
        servers = masters(setup)
        backend = create_backend(setup.url, BrokerOptions(key_prefix="bench"))
        received: list[int] = [0]

        def on_message(message: Message) -> None:
            received[0] += 1

        await backend.broker.start(on_message, lambda which: None)
        channels = [f"prices:{n}" for n in range(args.channels)]
        for channel in channels:
            await backend.broker.subscribe(channel)
        # What each Redis spends idle (its timers, the readers' pings) is not the
        # publications': measured over a quiet second, and taken off.
        quiet = cpu(servers)
        await asyncio.sleep(1.0)
        before = cpu(servers)
        idle = [b - q for b, q in zip(before, quiet, strict=True)]
        began = time.perf_counter()
        sent = await paced(backend.broker, channels, args.rate, args.seconds, topology.batch)
        took = time.perf_counter() - began
        used = [
            max(0.0, after - b - i * took)
            for after, b, i in zip(cpu(servers), before, idle, strict=True)
        ]
        rate = await flat_out(backend.broker, channels, args.flat_out, topology.batch)
        await backend.broker.close()
    finally:
        await asyncio.to_thread(setup.close)
    per_pub = [u / sent * 1e6 for u in used]
    busiest = max(used) / args.seconds * 100
    return (
        f"| {topology.name} | {len(servers)} | {sent / args.seconds:,.0f} | "
        f"{' / '.join(f'{p:.1f}' for p in per_pub)} | {sum(per_pub):.1f} | "
        f"{busiest:.1f} % | {rate:,.0f} |"
    )


TOPOLOGIES = {
    "one": Topology("one Redis", lambda: RedisServer().start()),
    "one-batched": Topology("one Redis, `publish_many` of 10", lambda: RedisServer().start(), 10),
    "sentinel": Topology(
        "Sentinel: a master and its replica", lambda: RedisSentinelSetup().start()
    ),
    "shards2": Topology("two shards", lambda: RedisShards(2).start()),
    "shards3": Topology("three shards", lambda: RedisShards(3).start()),
    "cluster": Topology(
        "Redis Cluster, 3 masters + 3 replicas", lambda: RedisClusterSetup().start()
    ),
}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("topologies", nargs="*", choices=[*TOPOLOGIES, []])
    parser.add_argument("--rate", type=float, default=2000.0, help="publications/s in total")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--channels", type=int, default=300)
    parser.add_argument("--flat-out", type=int, default=20000, help="publications, flat out")
    args = parser.parse_args()
    print(
        "| topology | masters | paced pub/s | Redis CPU µs per pub., each master | sum | "
        "busiest master's CPU | flat-out pub/s (50 publishers) |"
    )
    print("|---|---:|---:|---|---:|---:|---:|")
    for name in args.topologies or TOPOLOGIES:
        print(await measure(TOPOLOGIES[name], args), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
