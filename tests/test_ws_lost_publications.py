"""Publications a worker could not get, for good: its Redis pub/sub link was down while
more was published than history keeps. An SSE stream is told with ``event: gap``; a
WebSocket has no push for it, so the gateway closes it with 4009 ``insufficient state``
before anything of the channel after the hole, and the client's resubscribe from its
position answers ``recovered: false`` (docs/protocol.md, "Subscribe and recovery").

The gateway and Redis are real; the worker's pub/sub reconnect is held back by a gate
(as in tests/test_hub_redis.py) so that the publications certainly happen while it is
cut off.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis
from websockets.exceptions import ConnectionClosed

from channels.backends.redis import Connection
from gatewayclient import Gap, Publication, connect
from tests.conftest import MakeServer, RunningServer, eventually, token
from tests.helpers import api_client, api_publish, open_sse, ws_client
from tests.redis_server import RedisServer
from tests.test_redis_broker import kill_connections

HISTORY = 3


@pytest.fixture
async def admin(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


async def gateway(make_server: MakeServer, redis_server: RedisServer, prefix: str) -> Any:
    return await make_server(
        broker_url=redis_server.url, broker_prefix=prefix, history_size=HISTORY
    )


def pubsub_of(server: RunningServer) -> Connection:
    connection = server.gateway.hub._broker.connection
    assert isinstance(connection, Connection)
    return connection


async def cut_off(server: RunningServer, admin: Redis) -> asyncio.Event:
    """Drop the worker's pub/sub link and hold its reconnect until the event is set."""
    connection = pubsub_of(server)
    connection.reconnect_base, connection.reconnect_cap = 0.02, 0.2
    gate = asyncio.Event()
    reopen = connection._open_pubsub

    async def gated() -> Any:
        await gate.wait()
        return await reopen()

    connection._open_pubsub = gated  # type: ignore[method-assign]
    assert await kill_connections(admin, connection) >= 1
    await eventually(lambda: not connection.connected)
    return gate


async def test_a_websocket_that_missed_publications_for_good_is_closed_4009_and_told_on_resubscribe(
    make_server: MakeServer, redis_server: RedisServer, redis_prefix: str, admin: Redis
) -> None:
    server = await gateway(make_server, redis_server, redis_prefix)
    async with api_client(server) as http, ws_client(server) as ws:
        await ws.subscribe("lost")
        first = await api_publish(http, "lost", 1)
        [push] = await ws.publications("lost", 1)
        assert push["offset"] == first["offset"] == 1
        gate = await cut_off(server, admin)
        for n in range(2, 2 + 3 * HISTORY):  # more than history keeps
            await api_publish(http, "lost", n)
        gate.set()
        with pytest.raises(ConnectionClosed) as closed:
            while True:  # nothing of the channel after the hole comes first
                frame = await ws.recv(timeout=10)
                assert frame.get("channel") != "lost", frame
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4009, "insufficient state")
    async with ws_client(server) as again:
        since = {"offset": 1, "epoch": first["epoch"]}
        result = await again.subscribe("lost", since=since)
        assert result["recovered"] is False
        assert result["epoch"] == first["epoch"] and result["offset"] == 1 + 3 * HISTORY


async def test_an_sse_stream_that_missed_publications_for_good_gets_a_gap_and_stays(
    make_server: MakeServer, redis_server: RedisServer, redis_prefix: str, admin: Redis
) -> None:
    server = await gateway(make_server, redis_server, redis_prefix)
    async with api_client(server) as http, open_sse(http, ["lost"]) as sse:
        await api_publish(http, "lost", 1)
        [event] = await sse.publications(1)
        gate = await cut_off(server, admin)
        for n in range(2, 2 + 3 * HISTORY):
            await api_publish(http, "lost", n)
        gate.set()
        await eventually(lambda: pubsub_of(server).connected)
        last = await api_publish(http, "lost", "after")
        gap = await sse.data_event()
        assert (gap.get("event"), gap["json"]) == ("gap", {"channel": "lost"})
        [after] = await sse.publications(1)
        assert after["json"]["offset"] == last["offset"] and event["json"]["offset"] == 1


async def test_the_python_client_comes_back_after_4009_with_a_gap_then_live(
    make_server: MakeServer, redis_server: RedisServer, redis_prefix: str, admin: Redis
) -> None:
    """What the repository's client makes of it: the close, a reconnect within a second,
    a ``Gap`` for the lost publications (its position to the channel's), then live ones."""
    server = await gateway(make_server, redis_server, redis_prefix)
    async with connect(server.url, token=token()) as client, api_client(server) as http:
        sub = await client.subscribe("lost")
        await api_publish(http, "lost", 1)
        assert isinstance(first := await sub.get(5), Publication) and first.offset == 1
        gate = await cut_off(server, admin)
        for n in range(2, 2 + 3 * HISTORY):
            await api_publish(http, "lost", n)
        gate.set()
        gap = await sub.get(10)
        assert isinstance(gap, Gap), gap
        assert (gap.reason, gap.last_offset, gap.offset) == ("history", 1, 1 + 3 * HISTORY)
        assert client.last_close == (4009, "insufficient state")
        last = await api_publish(http, "lost", "after")
        after = await sub.get(5)
        assert isinstance(after, Publication) and after.offset == last["offset"]
