"""What the Redis broker's guarantees cost: publish through the Lua script (offset + history +
PUBLISH, atomically) against a plain PUBLISH (what broadcaster does), and how fast one
worker's pub/sub reader delivers.

    .venv/bin/python scripts/bench_redis_broker.py [N]

Starts its own redis-server (tests/redis_server.py); prints one line per measurement.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from redis.asyncio import Redis

from channels.broker import BrokerOptions, create_backend
from channels.publication import Message
from tests.redis_server import RedisServer

PAYLOAD = b'{"symbol":"ACME","price":101.25,"ts":1700000000.123}'


async def timed(label: str, n: int, run: object) -> None:
    started = time.perf_counter()
    await run  # type: ignore[misc]
    elapsed = time.perf_counter() - started
    print(f"{label:<58} {elapsed:6.2f} s  {n / elapsed:9,.0f} msg/s")


async def bench(url: str, n: int) -> None:
    plain = Redis.from_url(url)
    broker = create_backend(url, BrokerOptions(key_prefix="bench")).broker
    received: list[Message] = []
    done = asyncio.Event()

    def on_message(message: Message) -> None:
        received.append(message)
        if len(received) == n:
            done.set()

    await broker.start(on_message, lambda: None)

    async def sequential_plain() -> None:
        for _ in range(n):
            await plain.publish("bench:plain", PAYLOAD)

    async def sequential_script() -> None:
        for _ in range(n):
            await broker.publish("seq", PAYLOAD)

    async def concurrent(publish: object, tasks: int = 50) -> None:
        async def worker(count: int) -> None:
            for _ in range(count):
                await publish()  # type: ignore[operator]

        await asyncio.gather(*(worker(n // tasks) for _ in range(tasks)))

    await timed(f"{n} x plain PUBLISH, sequential", n, sequential_plain())
    await timed(f"{n} x publish script (offset+XADD+PUBLISH), sequential", n, sequential_script())
    await timed(
        f"{n} x plain PUBLISH, 50 concurrent",
        n,
        concurrent(lambda: plain.publish("bench:plain", PAYLOAD)),
    )
    await timed(
        f"{n} x publish script, 50 concurrent",
        n,
        concurrent(lambda: broker.publish("conc", PAYLOAD)),
    )

    await broker.subscribe("fanout")

    async def fanout() -> None:
        await concurrent(lambda: broker.publish("fanout", PAYLOAD))
        await done.wait()

    await timed(f"{n} x publish script -> received by the pub/sub reader", n, fanout())
    offsets = [m.offset for m in received if hasattr(m, "offset")]
    assert offsets == list(range(1, n + 1)), "out of order or lost"
    await broker.close()
    await plain.aclose()


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    server = RedisServer().start()
    try:
        print(f"redis-server {server.binary} on port {server.port}")
        asyncio.run(bench(server.url, n))
    finally:
        server.close()


if __name__ == "__main__":
    main()
