"""What the Redis broker's guarantees cost: publish through the Lua script (offset + history +
PUBLISH, atomically) against a plain PUBLISH (what broadcaster does), how fast one
worker's pub/sub reader delivers, and what batching buys: the coalescer in front of the
broker (``channels.coalescer``, what ``Hub.publish`` uses) and ``publish_many`` batches of
the size an NDJSON chunk brings.

    .venv/bin/python scripts/bench_redis_broker.py [N] [--sizes 10,100,256,1000]

Starts its own redis-server (tests/redis_server.py); prints one line per measurement:
publications per second, publications per script call (``INFO commandstats``), and the
redis-server's CPU per publication (``INFO cpu``, used_cpu_user + used_cpu_sys before
and after; measured the same way on every line, so the lines compare what each way of
publishing costs Redis).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from redis.asyncio import Redis

from channels.backend_url import create_backend
from channels.broker import Broker, BrokerOptions
from channels.coalescer import Coalescer
from channels.publication import Message, Publication
from tests.redis_server import RedisServer, evalsha_calls

PAYLOAD = b'{"symbol":"ACME","price":101.25,"ts":1700000000.123}'
CONCURRENCY = 50


async def redis_cpu(admin: Redis) -> float:
    info = await admin.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


class Bench:
    def __init__(self, admin: Redis) -> None:
        self.admin = admin

    async def timed(self, label: str, n: int, run: Awaitable[object]) -> None:
        calls = await evalsha_calls(self.admin)
        cpu = await redis_cpu(self.admin)
        started = time.perf_counter()
        await run
        elapsed = time.perf_counter() - started
        cpu = await redis_cpu(self.admin) - cpu
        calls = await evalsha_calls(self.admin) - calls
        per_call = f"{n / calls:5.1f}/call" if calls > 0 else " " * 10
        print(
            f"{label:<62} {elapsed:6.2f} s {n / elapsed:9,.0f} pub/s {per_call}"
            f"  redis {cpu / n * 1e6:5.1f} us/pub",
            flush=True,
        )


async def concurrent(publish: Callable[[], Awaitable[object]], n: int) -> None:
    """``n`` publishes by ``CONCURRENCY`` publishers, each awaiting its own in turn."""

    async def publisher(count: int) -> None:
        for _ in range(count):
            await publish()

    await asyncio.gather(*(publisher(n // CONCURRENCY) for _ in range(CONCURRENCY)))


async def batched(broker: Broker, channel: str, n: int, size: int) -> None:
    """``n`` publications in ``publish_many`` calls of ``size``, one after the other: a
    streamed NDJSON body whose chunks carry ``size`` lines each."""
    for start in range(0, n, size):
        await broker.publish_many(channel, [PAYLOAD] * min(size, n - start))


async def bench(url: str, n: int, sizes: list[int]) -> None:
    plain = Redis.from_url(url)
    admin = Redis.from_url(url)
    b = Bench(admin)
    broker = create_backend(url, BrokerOptions(key_prefix="bench")).broker
    coalescer = Coalescer(broker)
    received: list[Message] = []
    done = asyncio.Event()
    expected = n

    def on_message(message: Message) -> None:
        received.append(message)
        if len(received) == expected:
            done.set()

    await broker.start(on_message, lambda *_: None)

    async def sequential_plain() -> None:
        for _ in range(n):
            await plain.publish("bench:plain", PAYLOAD)

    async def sequential_script() -> None:
        for _ in range(n):
            await broker.publish("seq", PAYLOAD)

    await b.timed(f"{n} x plain PUBLISH, sequential", n, sequential_plain())
    await b.timed(f"{n} x publish script (offset+XADD+PUBLISH), sequential", n, sequential_script())
    await b.timed(
        f"{n} x plain PUBLISH, {CONCURRENCY} concurrent",
        n,
        concurrent(lambda: plain.publish("bench:plain", PAYLOAD), n),
    )
    await b.timed(
        f"{n} x publish script, {CONCURRENCY} concurrent, one channel",
        n,
        concurrent(lambda: broker.publish("conc", PAYLOAD), n),
    )
    await b.timed(
        f"{n} x coalescer, {CONCURRENCY} concurrent, one channel",
        n,
        concurrent(lambda: coalescer.publish("coal", PAYLOAD), n),
    )
    for size in sizes:
        await b.timed(
            f"{n} x publish_many of {size}, sequential (NDJSON chunks)",
            n,
            batched(broker, f"many{size}", n, size),
        )
    for size in sizes[:2]:
        streams = (
            batched(broker, f"streams{size}-{k}", n // CONCURRENCY, size)
            for k in range(CONCURRENCY)
        )
        await b.timed(
            f"{n} x publish_many of {size}, {CONCURRENCY} streams on their channels",
            n,
            asyncio.gather(*streams),
        )

    # Through one worker's pub/sub reader: from the first publish until the last
    # publication reached on_message, in order.
    async def delivered(channel: str, publish: Awaitable[object]) -> None:
        nonlocal expected
        received.clear()
        done.clear()
        expected = n
        await broker.subscribe(channel)
        await publish
        await done.wait()
        offsets = [m.offset for m in received if isinstance(m, Publication)]
        assert offsets == list(range(1, n + 1)), "out of order or lost"
        await broker.unsubscribe(channel)

    await b.timed(
        f"{n} x publish script, {CONCURRENCY} concurrent -> received by the reader",
        n,
        delivered("fanout", concurrent(lambda: broker.publish("fanout", PAYLOAD), n)),
    )
    await b.timed(
        f"{n} x coalescer, {CONCURRENCY} concurrent -> received by the reader",
        n,
        delivered("fanout-c", concurrent(lambda: coalescer.publish("fanout-c", PAYLOAD), n)),
    )
    for size in sizes:
        await b.timed(
            f"{n} x publish_many of {size} -> received by the reader",
            n,
            delivered(f"fanout-{size}", batched(broker, f"fanout-{size}", n, size)),
        )
    await coalescer.close()
    await broker.close()
    await plain.aclose()
    await admin.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("n", nargs="?", type=int, default=10_000, help="publications per line")
    parser.add_argument(
        "--sizes",
        default="10,100",
        help="publish_many batch sizes, comma-separated (default 10,100)",
    )
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    server = RedisServer().start()
    try:
        print(f"redis-server {server.binary} on port {server.port}")
        asyncio.run(bench(server.url, args.n, sizes))
    finally:
        server.close()


if __name__ == "__main__":
    main()
