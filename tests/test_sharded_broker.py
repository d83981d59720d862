"""What only a sharded backend has to do (the shared contracts run over it too, see
tests/contract.py): place each channel on one shard for every worker alike, keep a
shard that is down from failing the others' channels, and recover only the channels of
a shard that reconnected."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Iterator

import pytest
from redis.asyncio import Redis

from channels.backend_url import create_backend, split_urls
from channels.backends.sharded import ShardedBroker, jump_hash, shard_of
from channels.broker import BrokerOptions, BrokerUnavailable
from tests.conftest import eventually
from tests.contract import Worker
from tests.redis_server import RedisServer


def test_a_channel_has_one_shard_and_channels_spread_evenly() -> None:
    names = [f"prices:{n}" for n in range(3000)]
    placed = [shard_of(name, 3) for name in names]
    assert placed == [shard_of(name, 3) for name in names]  # the same for every worker
    counts = Counter(placed)
    assert set(counts) == {0, 1, 2}
    assert all(800 < count < 1200 for count in counts.values()), counts


def test_a_shard_added_at_the_end_only_takes_channels_from_the_others() -> None:
    keys = range(0, 10_000_000, 997)
    before = [jump_hash(key, 3) for key in keys]
    after = [jump_hash(key, 4) for key in keys]
    moved = [(b, a) for b, a in zip(before, after, strict=True) if b != a]
    assert all(a == 3 for _, a in moved)  # nothing moves between the old shards
    assert 0.2 < len(moved) / len(before) < 0.3  # about a quarter moves to the new one


def test_urls_split_into_shards_even_with_sentinel_address_lists() -> None:
    assert split_urls("redis://a:1/0") == ["redis://a:1/0"]
    assert split_urls("redis://a:1/0, rediss://b:2/1") == ["redis://a:1/0", "rediss://b:2/1"]
    sentinels = "redis+sentinel://h1:1,h2:2/one/0,redis+sentinel://h3:3,h4:4/two"
    assert split_urls(sentinels) == [
        "redis+sentinel://h1:1,h2:2/one/0",
        "redis+sentinel://h3:3,h4:4/two",
    ]


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("memory://a,memory://b", "cannot be sharded"),
        ("redis://a:1/0,memory://b", "cannot be sharded"),
        ("redis://a:1/0,nats://b:2", "cannot be sharded"),
        ("redis+sentinel://h1:1,h2:2", "service"),
        ("redis+sentinel://h1:1/svc/x", "service"),
        ("redis+sentinel://h1/svc", "host:port"),
        ("kafka://h:1", "unsupported broker URL scheme 'kafka'"),
    ],
)
def test_a_bad_broker_url_is_refused_saying_why(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        create_backend(url, BrokerOptions())


@pytest.fixture
def two_shards() -> Iterator[list[RedisServer]]:
    servers = [RedisServer().start(), RedisServer().start()]
    yield servers
    for server in servers:
        server.close()


@pytest.fixture
async def sharded(two_shards: list[RedisServer], redis_prefix: str) -> AsyncIterator[Worker]:
    url = ",".join(server.url for server in two_shards)
    worker = Worker(create_backend(url, BrokerOptions(key_prefix=redis_prefix)))
    worker.listen()
    await worker.start()
    yield worker
    await worker.broker.close()


def channels_on_each_shard(broker: ShardedBroker, count: int) -> list[list[str]]:
    """``count`` channel names placed on each shard."""
    found: list[list[str]] = [[] for _ in broker.brokers]
    n = 0
    while min(len(names) for names in found) < count:
        name = f"c{n}"
        if len(found[broker.shard(name)]) < count:
            found[broker.shard(name)].append(name)
        n += 1
    return found


async def test_each_channel_is_stored_and_fanned_out_on_its_own_shard_only(
    sharded: Worker, two_shards: list[RedisServer], redis_prefix: str
) -> None:
    broker = sharded.broker
    assert isinstance(broker, ShardedBroker)
    (first, *_), (second, *_) = channels_on_each_shard(broker, 1)
    for channel in (first, second):
        await broker.subscribe(channel)
        await sharded.presence.add(channel, "c-1", b"{}")
        await broker.publish(channel, b"1")
    for server, mine, other in ((two_shards[0], first, second), (two_shards[1], second, first)):
        admin = Redis.from_url(server.url, decode_responses=True)
        try:
            keys = {str(key) for key in await admin.keys(f"{redis_prefix}:*")}
            assert f"{redis_prefix}:h:{{{mine}}}" in keys
            assert not any(f"{{{other}}}" in key for key in keys)
            topic = f"{redis_prefix}:t:{{{mine}}}"
            assert (await admin.pubsub_numsub(topic))[0][1] == 1
        finally:
            await admin.aclose()
    await eventually(lambda: len(sharded.received.publications(first)) == 1)
    await eventually(lambda: len(sharded.received.publications(second)) == 1)
    assert await sharded.presence.list(second) == [b"{}"]


async def test_a_shard_down_fails_only_its_channels_and_only_they_are_recovered(
    sharded: Worker, two_shards: list[RedisServer], caplog: pytest.LogCaptureFixture
) -> None:
    broker, received = sharded.broker, sharded.received
    assert isinstance(broker, ShardedBroker)
    for broker_of_shard in broker.brokers:  # quick reconnects for the test
        connection = broker_of_shard.connection  # type: ignore[attr-defined]
        connection.reconnect_base, connection.reconnect_cap = 0.02, 0.2
    (up, *_), (down, *_) = channels_on_each_shard(broker, 1)
    await broker.subscribe(up)
    await broker.subscribe(down)
    assert await broker.ready()

    two_shards[1].stop()
    await eventually(lambda: not broker.brokers[1].connection.connected)  # type: ignore[attr-defined]
    assert not await broker.ready()
    lost = [r.getMessage() for r in caplog.records if "connection lost" in r.getMessage()]
    assert lost and all(f"127.0.0.1:{two_shards[1].port}/0" in line for line in lost)
    with pytest.raises(BrokerUnavailable):
        await broker.publish(down, b"lost")
    with pytest.raises(BrokerUnavailable):
        await sharded.presence.list(down)
    published = await broker.publish(up, b"still")  # the other shard carries on
    await eventually(lambda: [p.offset for p in received.publications(up)] == [published.offset])
    await sharded.signals.signal(b"hello")  # signals live on the first shard
    await eventually(lambda: received.signals == [b"hello"])

    two_shards[1].start()
    await eventually(lambda: received.resyncs == 1, timeout=10)
    assert await broker.ready()
    which = received.resynced[0]
    assert which(down) and not which(up)  # only the shard that was away is recovered
    await asyncio.wait_for(broker.publish(down, b"back"), 5)
    await eventually(lambda: len(received.publications(down)) == 1)
