"""What only the Redis Cluster backend has to do (the shared contracts run over it too,
failovers and migrations are in tests/test_redis_failover.py): keep each channel's keys
and fan-out on the master of its slot, with sharded pub/sub, and make a burst of
commands wait for connections rather than fail."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from channels.backend_url import create_backend
from channels.backends.redis import ClusterConnection, RedisBroker
from channels.broker import BrokerOptions, HistoryQuery
from tests.conftest import eventually
from tests.contract import Worker
from tests.redis_topologies import RedisClusterSetup, query


@pytest.fixture
async def worker(redis_cluster: RedisClusterSetup, redis_prefix: str) -> AsyncIterator[Worker]:
    worker = Worker(create_backend(redis_cluster.url, BrokerOptions(key_prefix=redis_prefix)))
    worker.listen()
    await worker.start()
    yield worker
    await worker.broker.close()


async def test_a_channel_lives_and_fans_out_on_the_master_of_its_slot_only(
    worker: Worker, redis_cluster: RedisClusterSetup, redis_prefix: str
) -> None:
    broker = worker.broker
    names = ["doomed", "kept", "moving"]  # slots on three different masters
    for name in names:
        await broker.subscribe(name)
        await broker.publish(name, b"1")
    for name in names:
        topic = f"{redis_prefix}:t:{{{name}}}"
        owner = redis_cluster.master_of_slot(redis_cluster.slot_of(topic))
        for master in redis_cluster.masters():
            mine = master.port == owner.port
            # Sharded pub/sub: the subscription is on the owner only, plain pub/sub unused.
            shard = query(master.port, "PUBSUB", "SHARDNUMSUB", topic)
            assert shard == [topic, 1 if mine else 0]
            assert query(master.port, "PUBSUB", "NUMSUB", topic) == [topic, 0]
            history = f"{redis_prefix}:h:{{{name}}}"
            assert query(master.port, "KEYS", history) == ([history] if mine else [])
    await eventually(lambda: all(len(worker.received.publications(n)) == 1 for n in names))
    link = broker.connection if isinstance(broker, RedisBroker) else None
    assert isinstance(link, ClusterConnection)
    assert len(link._readers) == 3  # one pub/sub reader per master


async def test_a_burst_of_commands_waits_for_connections_instead_of_failing(
    worker: Worker,
) -> None:
    broker = worker.broker
    assert isinstance(broker, RedisBroker) and isinstance(broker.connection, ClusterConnection)
    burst = 10 * broker.connection.pool_size  # far more than a node holds connections
    published = await asyncio.gather(*(broker.publish("kept", b"%d" % n) for n in range(burst)))
    assert sorted(p.offset for p in published) == list(range(1, burst + 1))
    pages = await asyncio.gather(*(broker.history("kept", limit=1) for _ in range(burst)))
    assert all(page.position.offset == burst for page in pages)


async def test_a_channels_position_is_read_behind_its_ssubscribe_on_its_master(
    worker: Worker, redis_cluster: RedisClusterSetup, redis_prefix: str
) -> None:
    """One round trip per channel new to the worker on a Cluster too: the history script
    goes behind the SSUBSCRIBE on the reader of the slot's master (the channel's keys are
    there), for channels on every master."""
    broker = worker.broker
    names = ["doomed", "kept", "moving"]  # slots on three different masters
    for name in names:
        await broker.publish(name, b"1")
        await broker.history(name)  # the history script loaded on that master
    for name in names:
        page = await broker.subscribe(name, HistoryQuery(limit=0))
        assert page is not None, name
        assert page.position.offset == 1 and page.publications == []
        topic = f"{redis_prefix}:t:{{{name}}}"
        owner = redis_cluster.master_of_slot(redis_cluster.slot_of(topic))
        assert query(owner.port, "PUBSUB", "SHARDNUMSUB", topic) == [topic, 1]
    for name in names:
        await broker.publish(name, b"2")
    await eventually(lambda: all(len(worker.received.publications(n)) == 1 for n in names))
