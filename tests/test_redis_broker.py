"""What only the Redis broker has to do (the shared contract is tests/test_broker_contract.py):
several workers sharing one sequence, surviving a lost pub/sub connection or a Redis
restart, presence expiring when a worker dies, and its key layout."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from redis.asyncio import Redis

from channels.backends import redis as redis_backend
from channels.backends.redis import RedisBroker
from channels.broker import BrokerOptions, BrokerUnavailable
from channels.publication import StreamPosition
from tests.conftest import eventually
from tests.helpers import poll
from tests.redis_server import RedisServer
from tests.test_broker_contract import Received

MakeBroker = Callable[..., Awaitable[RedisBroker]]


async def kill_connections(admin: Redis, broker: RedisBroker) -> int:
    """Close every connection of ``broker`` from the server side (a network blip)."""
    name = f"gateway:{broker._prefix}"
    clients = [c for c in await admin.client_list() if c.get("name") == name]
    for client in clients:
        await admin.client_kill_filter(_id=client["id"])
    return len(clients)


@pytest.fixture
async def admin(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


def broker_factory(url: str, prefix: str) -> tuple[MakeBroker, list[RedisBroker]]:
    opened: list[RedisBroker] = []

    async def make(received: Received | None = None, **options: Any) -> RedisBroker:
        options.setdefault("key_prefix", prefix)
        broker = RedisBroker(url, BrokerOptions(**options))
        broker.reconnect_base, broker.reconnect_cap = 0.02, 0.2  # quick tests
        sink = received or Received()
        await broker.start(sink.on_message, sink.on_resync)
        opened.append(broker)
        return broker

    return make, opened


@pytest.fixture
async def make_broker(redis_server: RedisServer, redis_prefix: str) -> AsyncIterator[MakeBroker]:
    make, opened = broker_factory(redis_server.url, redis_prefix)
    yield make
    for broker in opened:
        await broker.close()


@pytest.fixture
async def make_own_broker(
    own_redis_server: RedisServer, redis_prefix: str
) -> AsyncIterator[MakeBroker]:
    """Brokers on this test's own redis-server (which the test may stop and restart)."""
    make, opened = broker_factory(own_redis_server.url, redis_prefix)
    yield make
    for broker in opened:
        await broker.close()


async def test_workers_share_one_gapless_sequence_and_all_see_it_in_order(
    make_broker: MakeBroker,
) -> None:
    sinks = [Received() for _ in range(3)]
    workers = [await make_broker(sink) for sink in sinks]
    for worker in workers:
        await worker.subscribe("c")

    async def publish_many(worker: RedisBroker, n: int) -> list[int]:
        return [(await worker.publish("c", b"%d" % i)).offset for i in range(n)]

    results = await asyncio.gather(*(publish_many(w, 200) for w in workers))
    assigned = sorted(offset for offsets in results for offset in offsets)
    assert assigned == list(range(1, 601))
    for sink in sinks:
        await eventually(lambda sink=sink: len(sink.publications("c")) == 600)  # type: ignore[misc]
        assert [p.offset for p in sink.publications("c")] == list(range(1, 601))
        assert len({p.epoch for p in sink.publications("c")}) == 1


async def test_subscribe_returns_once_redis_confirmed_it(
    make_broker: MakeBroker, admin: Redis, redis_prefix: str
) -> None:
    """Why it matters: a subscribe that returned before the SUBSCRIBE reached Redis would let
    a join miss what is published between it and the join's history read."""
    broker = await make_broker()
    await broker.subscribe("c")
    counts = await admin.pubsub_numsub(f"{redis_prefix}:t:{{c}}")
    assert counts[0][1] == 1
    await broker.subscribe("c")  # idempotent: still one subscription
    assert (await admin.pubsub_numsub(f"{redis_prefix}:t:{{c}}"))[0][1] == 1
    await broker.unsubscribe("c")
    await broker.unsubscribe("c")

    async def unsubscribed() -> bool:
        return (await admin.pubsub_numsub(f"{redis_prefix}:t:{{c}}"))[0][1] == 0

    await poll(unsubscribed)


async def test_a_killed_pubsub_connection_reconnects_resubscribes_and_resyncs(
    make_broker: MakeBroker, admin: Redis
) -> None:
    received = Received()
    subscriber = await make_broker(received)
    publisher = await make_broker()
    for channel in ("a", "b"):
        await subscriber.subscribe(channel)
    await publisher.publish("a", b"1")
    await eventually(lambda: len(received.publications("a")) == 1)

    assert await kill_connections(admin, subscriber) >= 1
    await eventually(lambda: subscriber.reconnects == 1 and received.resyncs == 1)
    # Both channels are subscribed again: live publications flow.
    await publisher.publish("a", b"2")
    await publisher.publish("b", b"1")
    await eventually(lambda: len(received.publications("a")) == 2 and received.publications("b"))
    assert [p.offset for p in received.publications("a")] == [1, 2]
    assert await subscriber.ready()


async def test_redis_down_fails_fast_and_a_restart_resubscribes_and_resyncs(
    make_own_broker: MakeBroker, own_redis_server: RedisServer
) -> None:
    received = Received()
    broker = await make_own_broker(received)
    await broker.subscribe("c")
    first = await broker.publish("c", b"1")
    await eventually(lambda: received.publications("c"))

    own_redis_server.stop(save=True)
    await eventually(lambda: not broker._connected.is_set())
    assert not await broker.ready()
    calls: list[Callable[[], Awaitable[Any]]] = [
        lambda: broker.publish("c", b"2"),
        lambda: broker.history("c"),
        lambda: broker.presence("chat:c"),
        lambda: broker.presence_add("chat:c", "c-1", b"{}"),
        lambda: broker.presence_remove("chat:c", "c-1"),
        lambda: broker.publish_event("chat:c", "join", b"{}"),
    ]
    for call in calls:
        started = time.monotonic()
        with pytest.raises(BrokerUnavailable):
            await call()
        assert time.monotonic() - started < 1.0
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable):
        await broker.subscribe("other")
    assert time.monotonic() - started < redis_backend.CONNECT_TIMEOUT + 1

    own_redis_server.start()
    await eventually(lambda: broker.reconnects == 1 and received.resyncs == 1, timeout=10)
    assert await broker.ready()
    second = await broker.publish("c", b"2")  # the snapshot kept the channel's state
    assert (second.offset, second.epoch) == (2, first.epoch)
    await eventually(lambda: len(received.publications("c")) == 2)
    await broker.subscribe("other")  # nothing was left half-subscribed


async def test_redis_restarted_empty_starts_a_new_epoch(
    make_own_broker: MakeBroker, own_redis_server: RedisServer
) -> None:
    received = Received()
    broker = await make_own_broker(received)
    await broker.subscribe("c")
    before = [await broker.publish("c", b"%d" % i) for i in range(3)]
    own_redis_server.restart()
    await eventually(lambda: received.resyncs == 1, timeout=10)
    page = await broker.history("c", since=before[-1].position)
    assert not page.complete
    assert page.position.offset == 0 and page.position.epoch != before[0].epoch
    after = await broker.publish("c", b"x")
    assert (after.offset, after.epoch) == (1, page.position.epoch)
    delivered = await eventually(
        lambda: [p for p in received.publications("c") if p.epoch == after.epoch]
    )
    assert [p.offset for p in delivered] == [1]


async def test_a_broker_started_while_redis_is_down_connects_later(
    redis_prefix: str,
) -> None:
    server = RedisServer()  # not started yet
    received = Received()
    broker = RedisBroker(server.url, BrokerOptions(key_prefix=redis_prefix))
    broker.reconnect_base, broker.reconnect_cap = 0.02, 0.2
    try:
        await broker.start(received.on_message, received.on_resync)
        assert not await broker.ready()
        server.start()
        await eventually(lambda: broker._connected.is_set(), timeout=10)
        assert await broker.ready()
        await broker.subscribe("c")
        await broker.publish("c", b"1")
        await eventually(lambda: received.publications("c"))
        assert broker.reconnects == 0  # the first connection is not a reconnect
    finally:
        await broker.close()
        server.close()


async def test_a_silent_pubsub_connection_is_detected_by_ping(
    make_broker: MakeBroker, admin: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection that stays open but gets no answer (a network partition) is dropped."""
    monkeypatch.setattr(redis_backend, "COMMAND_TIMEOUT", 0.5)
    received = Received()
    broker = await make_broker(received)
    broker.ping_interval = 0.2
    await broker.subscribe("c")
    await admin.execute_command("CLIENT", "PAUSE", "1500", "ALL")
    await eventually(lambda: broker.reconnects >= 1 and received.resyncs >= 1, timeout=10)
    await broker.publish("c", b"1")
    await eventually(lambda: received.publications("c"))


async def test_presence_of_a_worker_that_stops_refreshing_expires_within_the_ttl(
    make_broker: MakeBroker,
) -> None:
    dead = await make_broker(presence_ttl=0.5)
    alive = await make_broker(presence_ttl=0.5)
    await dead.presence_add("chat:x", "c-dead", b'{"client":"c-dead"}')
    await alive.presence_add("chat:x", "c-alive", b'{"client":"c-alive"}')
    assert len(await alive.presence("chat:x")) == 2
    started = time.monotonic()
    while len(await alive.presence("chat:x")) == 2:
        await alive.presence_add("chat:x", "c-alive", b'{"client":"c-alive"}')  # refresh
        assert time.monotonic() - started < 3, "stale presence entry did not expire"
        await asyncio.sleep(0.05)
    assert time.monotonic() - started >= 0.3
    assert await alive.presence("chat:x") == [b'{"client":"c-alive"}']


async def test_keys_are_namespaced_hash_tagged_and_expire(
    make_broker: MakeBroker, admin: Redis, redis_prefix: str
) -> None:
    broker = await make_broker(history_ttl=60, history_meta_ttl=3600, presence_ttl=30)
    await broker.subscribe("chat:x")
    assert await admin.keys(f"{redis_prefix}*") == []  # subscribing stores nothing
    await broker.publish("chat:x", b"1")
    await broker.presence_add("chat:x", "c-1", b"{}")
    await broker.history("unknown:y")
    keys = sorted(k.decode() for k in await admin.keys(f"{redis_prefix}*"))
    assert keys == [
        f"{redis_prefix}:h:{{chat:x}}",
        f"{redis_prefix}:m:{{chat:x}}",
        f"{redis_prefix}:m:{{unknown:y}}",
        f"{redis_prefix}:p:{{chat:x}}",
        f"{redis_prefix}:z:{{chat:x}}",
    ]
    ttl = {key: await admin.pttl(key) for key in keys}
    assert 59_000 < ttl[f"{redis_prefix}:h:{{chat:x}}"] <= 60_000
    assert 3_590_000 < ttl[f"{redis_prefix}:m:{{chat:x}}"] <= 3_600_000
    assert 3_590_000 < ttl[f"{redis_prefix}:m:{{unknown:y}}"] <= 3_600_000
    assert 29_000 < ttl[f"{redis_prefix}:p:{{chat:x}}"] <= 30_000
    assert (await admin.xrange(f"{redis_prefix}:h:{{chat:x}}"))[0][0] == b"0-1"


async def test_offsets_and_epoch_outlive_the_history(make_broker: MakeBroker) -> None:
    broker = await make_broker(history_size=10, history_ttl=0.2, history_meta_ttl=60)
    first = await broker.publish("c", b"1")
    await broker.publish("c", b"2")
    top = StreamPosition(2, first.epoch)
    deadline = time.monotonic() + 5
    while (await broker.history("c")).publications:
        assert time.monotonic() < deadline, "history did not expire"
        await asyncio.sleep(0.05)
    page = await broker.history("c", since=top)
    assert page.complete and page.position == top  # a client at the top missed nothing
    assert not (await broker.history("c", since=StreamPosition(1, first.epoch))).complete
    third = await broker.publish("c", b"3")
    assert (third.offset, third.epoch) == (3, first.epoch)


async def test_history_size_zero_keeps_counting_without_storing(
    make_broker: MakeBroker, admin: Redis, redis_prefix: str
) -> None:
    broker = await make_broker(history_size=0)
    pubs = [await broker.publish("c", b"%d" % i) for i in range(3)]
    assert [p.offset for p in pubs] == [1, 2, 3]
    assert not await admin.exists(f"{redis_prefix}:h:{{c}}")
    page = await broker.history("c", since=pubs[-1].position)
    assert page.complete and page.publications == []
    assert not (await broker.history("c", since=pubs[0].position)).complete


async def test_a_history_stream_left_without_its_meta_is_not_served(
    make_broker: MakeBroker, admin: Redis, redis_prefix: str
) -> None:
    """If Redis evicts the meta but not the stream, the old entries belong to a lost epoch."""
    broker = await make_broker()
    old = [await broker.publish("c", b"%d" % i) for i in range(3)]
    await admin.delete(f"{redis_prefix}:m:{{c}}")
    page = await broker.history("c")
    assert page.publications == [] and page.position.epoch != old[0].epoch
    new = await broker.publish("c", b"x")
    assert (new.offset, new.epoch) == (1, page.position.epoch)


def test_a_key_prefix_with_braces_is_refused() -> None:
    with pytest.raises(ValueError, match="prefix"):
        RedisBroker("redis://127.0.0.1:1/0", BrokerOptions(key_prefix="a{b}"))


async def test_a_burst_bigger_than_the_pool_waits_for_connections(
    redis_server: RedisServer, redis_prefix: str, admin: Redis
) -> None:
    """Thousands of clients reconnecting at once queue for the bounded pool; none fails."""

    class SmallPool(RedisBroker):
        pool_size = 3  # the pub/sub connection and two for commands

    broker = SmallPool(redis_server.url, BrokerOptions(key_prefix=redis_prefix))
    sink = Received()
    await broker.start(sink.on_message, sink.on_resync)
    try:
        await broker.subscribe("burst")
        results = await asyncio.gather(
            *[broker.publish("burst", b"%d" % n) for n in range(200)],
            *[broker.history("burst", limit=0) for _ in range(200)],
        )
        offsets = sorted(r.offset for r in results[:200])
        assert offsets == list(range(1, 201))
        name = f"gateway:{redis_prefix}"
        connections = [c for c in await admin.client_list() if c.get("name") == name]
        assert 1 < len(connections) <= 3
    finally:
        await broker.close()
