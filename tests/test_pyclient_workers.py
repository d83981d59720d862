"""The Python client against real ``python -m gateway`` workers on one real Redis: one
of them is restarted (SIGTERM, drain, 1012) while a backend keeps publishing, and the
client moves to the other worker and resumes, losing and repeating nothing."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator

import pytest

from gatewayclient import Client, Gap, Item, Publication, Publisher, SseClient
from tests.conftest import SECRET, eventually, token
from tests.procs import GatewayProcess
from tests.redis_server import RedisServer

COUNT = 400


@pytest.fixture
async def workers(
    redis_server: RedisServer, redis_prefix: str
) -> AsyncIterator[list[GatewayProcess]]:
    env = {
        "GATEWAY_JWT_SECRET": SECRET,
        "GATEWAY_BROKER_URL": redis_server.url,
        "GATEWAY_BROKER_PREFIX": redis_prefix,
        "GATEWAY_DRAIN_SECONDS": "3",
        "GATEWAY_HISTORY_SIZE": "10000",
        "GATEWAY_LOG_LEVEL": "warning",
    }
    procs = [GatewayProcess(env), GatewayProcess(env)]
    try:
        await asyncio.gather(*(proc.wait_ready(timeout=30) for proc in procs))
        procs.append(GatewayProcess(env))  # the restarted first worker, started later
        yield procs
    finally:
        for proc in procs:
            proc.stop()


async def collect(source: Client | SseClient, channel: str, into: list[Item]) -> None:
    if isinstance(source, Client):
        async for item in source.subscriptions[channel]:
            into.append(item)
    else:
        async for item in source:
            into.append(item)


async def test_a_worker_restart_loses_nothing(workers: list[GatewayProcess]) -> None:
    first, second, restarted = workers
    client = Client([first.url, second.url], token=token("watcher"))
    sse = SseClient(first.url, ["ticks"], token=token("reader"))
    got: list[Item] = []
    sse_got: list[Item] = []
    await client.start()
    await client.subscribe("ticks")
    await sse.start()
    readers = [
        asyncio.create_task(collect(client, "ticks", got)),
        asyncio.create_task(collect(sse, "ticks", sse_got)),
    ]
    published_while_away = 0
    try:
        async with Publisher(second.url, token("backend")) as api:

            async def publish_all() -> None:
                nonlocal published_while_away
                for n in range(1, COUNT + 1):
                    await api.publish("ticks", n)
                    published_while_away += not client.connected
                    await asyncio.sleep(0.005)  # a steady trickle, not a synchronisation

            publisher = asyncio.create_task(publish_all())
            await eventually(lambda: len(got) >= 50, timeout=20)
            assert client.url == first.url
            first.proc.send_signal(signal.SIGTERM)
            await first.wait_exit(15)
            await restarted.wait_ready(timeout=30)
            # The SSE client knows only the first worker's address: point it at the new one,
            # as a load balancer would (its cursor goes along).
            sse.base = restarted.url
            await asyncio.wait_for(publisher, 60)
            await eventually(lambda: len(got) >= COUNT and len(sse_got) >= COUNT, timeout=20)
    finally:
        await client.close()
        await sse.close()
        for task in readers:
            task.cancel()
    assert client.connections == 2 and client.url == second.url
    assert published_while_away > 0
    assert sse.connections >= 2
    assert sse.repeats == client.subscriptions["ticks"].repeats == 0
    for items in (got, sse_got):
        assert not [i for i in items if isinstance(i, Gap)]
        assert [i.data for i in items if isinstance(i, Publication)] == list(range(1, COUNT + 1))
