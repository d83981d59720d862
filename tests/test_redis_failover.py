"""What the Redis backend does when its Redis changes under it (the shared contracts run
over every topology too, see tests/contract.py): a Sentinel master killed, a Redis
Cluster master killed, a Cluster slot migrated. Each time the worker finds the new
owner, resubscribes, recovers the channels concerned, and a channel that the old master
wrote continues in a new epoch (never an offset handed out twice)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from channels.backend_url import create_backend
from channels.backends.redis import ClusterConnection, Connection, RedisBroker
from channels.broker import BrokerOptions, BrokerUnavailable
from channels.publication import Publication
from tests.conftest import eventually
from tests.contract import Worker
from tests.helpers import poll
from tests.redis_server import RedisServer
from tests.redis_topologies import HOST, RedisClusterSetup, RedisSentinelSetup, query

MakeWorker = Callable[[str], Awaitable[Worker]]


@pytest.fixture
async def make_worker(redis_prefix: str) -> AsyncIterator[MakeWorker]:
    opened: list[Worker] = []

    async def make(url: str) -> Worker:
        worker = Worker(create_backend(url, BrokerOptions(key_prefix=redis_prefix)))
        broker = worker.broker
        assert isinstance(broker, RedisBroker)
        link = broker.connection
        if isinstance(link, Connection):  # quick reconnects for the tests
            link.reconnect_base, link.reconnect_cap = 0.02, 0.2
        else:
            link.relayout_base, link.relayout_cap = 0.05, 0.5
        opened.append(worker)
        worker.listen()
        await worker.start()
        return worker

    yield make
    for worker in opened:
        await worker.broker.close()


async def publish_when_back(worker: Worker, channel: str, data: bytes) -> Publication:
    """Publish, retrying while the broker is still finding the new master."""

    async def attempt() -> Publication | None:
        try:
            return await worker.broker.publish(channel, data)
        except BrokerUnavailable:
            return None

    published: Publication = await poll(attempt, timeout=20)
    return published


def wait_replicated(server: RedisServer) -> None:
    """Every write so far reached the replicas (so the test knows what a failover keeps)."""
    assert server.command("WAIT", "1", "2000") == b":1"


async def test_a_sentinel_failover_moves_to_the_new_master_with_a_new_epoch(
    own_redis_sentinel: RedisSentinelSetup, make_worker: MakeWorker
) -> None:
    setup = own_redis_sentinel
    worker = await make_worker(setup.url)
    received = worker.received
    await worker.broker.subscribe("c")
    before = [await worker.broker.publish("c", b"%d" % n) for n in range(3)]
    wait_replicated(setup.master())
    await eventually(lambda: len(received.publications("c")) == 3)

    setup.kill_master()
    await eventually(lambda: received.resyncs >= 1, timeout=20)
    after = await publish_when_back(worker, "c", b"after")
    # The promoted replica had all three, but cannot know that: a new epoch.
    assert after.offset == 1 and after.epoch != before[0].epoch
    await eventually(lambda: received.publications("c")[-1].epoch == after.epoch, timeout=10)
    assert await worker.broker.ready()
    page = await worker.broker.history("c", since=before[-1].position)
    assert not page.complete and page.position == after.position


async def test_a_cluster_master_killed_moves_its_channels_to_the_promoted_replica(
    own_redis_cluster: RedisClusterSetup, make_worker: MakeWorker, redis_prefix: str
) -> None:
    cluster = own_redis_cluster
    worker = await make_worker(cluster.url)
    broker, received = worker.broker, worker.received
    assert isinstance(broker, RedisBroker) and isinstance(broker.connection, ClusterConnection)
    await broker.subscribe("doomed")
    await broker.subscribe("kept")
    slot = cluster.slot_of(f"{redis_prefix}:t:{{doomed}}")
    kept_slot = cluster.slot_of(f"{redis_prefix}:t:{{kept}}")
    if cluster.master_of_slot(kept_slot).port == cluster.master_of_slot(slot).port:
        pytest.fail("pick channel names on different masters")  # fixed names: never flaky
    first = await broker.publish("doomed", b"1")
    kept = await broker.publish("kept", b"1")
    wait_replicated(cluster.master_of_slot(slot))

    cluster.kill_master_of_slot(slot)
    await eventually(lambda: any(which("doomed") for which in received.resynced), timeout=20)
    assert not any(which("kept") for which in received.resynced)
    after = await publish_when_back(worker, "doomed", b"2")
    assert after.offset == 1 and after.epoch != first.epoch
    await eventually(lambda: received.publications("doomed")[-1].position == after.position)
    # The other masters' channels kept their epochs and their subscriptions.
    more = await broker.publish("kept", b"2")
    assert more.position.epoch == kept.epoch and more.offset == 2
    await eventually(lambda: received.publications("kept")[-1].offset == 2)
    await poll(broker.ready, timeout=10)


async def test_a_migrated_slot_moves_the_subscription_and_keeps_the_epoch(
    own_redis_cluster: RedisClusterSetup, make_worker: MakeWorker, redis_prefix: str
) -> None:
    cluster = own_redis_cluster
    worker = await make_worker(cluster.url)
    broker, received = worker.broker, worker.received
    await broker.subscribe("moving")
    first = [await broker.publish("moving", b"%d" % n) for n in range(2)]
    await eventually(lambda: len(received.publications("moving")) == 2)
    slot = cluster.slot_of(f"{redis_prefix}:t:{{moving}}")
    owner = cluster.master_of_slot(slot)
    target = next(m for m in cluster.masters() if m.port != owner.port)

    cluster.migrate_slot(slot, target)
    await eventually(lambda: any(which("moving") for which in received.resynced), timeout=20)
    after = await publish_when_back(worker, "moving", b"after")
    # Nothing was lost in a migration: the keys came along, the offsets continue.
    assert after.position.epoch == first[0].epoch and after.offset == 3
    await eventually(lambda: [p.offset for p in received.publications("moving")] == [1, 2, 3])
    assert cluster.master_of_slot(slot).port == target.port


async def test_a_sentinel_down_leaves_the_others_to_name_the_master(
    own_redis_sentinel: RedisSentinelSetup, make_worker: MakeWorker
) -> None:
    setup = own_redis_sentinel
    worker = await make_worker(setup.url)
    await worker.broker.subscribe("c")
    setup.sentinels[0].close()  # the first one the worker would ask
    master = setup.master()
    # Drop the worker's connections: every new one asks the Sentinels where the master is.
    master.command("CLIENT", "KILL", "TYPE", "pubsub")
    master.command("CLIENT", "KILL", "TYPE", "normal")
    await eventually(lambda: worker.received.resyncs >= 1, timeout=20)
    published = await publish_when_back(worker, "c", b"1")
    await eventually(lambda: worker.received.publications("c")[-1:] == [published])
    assert await worker.broker.ready()


async def test_a_master_the_sentinels_no_longer_name_is_left_at_once(
    own_redis_sentinel: RedisSentinelSetup, make_worker: MakeWorker, own_redis_server: RedisServer
) -> None:
    """The Sentinels name another master while the old one goes on answering as one, as
    in a planned failover until they turn it into a replica (up to their INFO period, 10
    s, later): a worker left its connections on the old master all that while (redis-py
    asks the Sentinels only when a connection opens), its publishes landing there to be
    thrown away. Here the old master is never turned (the Sentinels are told to watch
    another server): the worker must leave it by itself, within a couple of seconds."""
    setup = own_redis_sentinel
    worker = await make_worker(setup.url)
    await worker.broker.subscribe("c")
    first = await worker.broker.publish("c", b"1")
    old, new = setup.master(), own_redis_server
    for sentinel in setup.sentinels:  # an operator's move: another server is the master
        query(sentinel.port, "SENTINEL", "REMOVE", setup.service_name)
        query(sentinel.port, "SENTINEL", "MONITOR", setup.service_name, HOST, new.port, 2)
    assert setup.master_address() == (HOST, new.port)
    await eventually(lambda: worker.received.resyncs >= 1, timeout=10)
    after = await publish_when_back(worker, "c", b"2")
    assert (after.offset, after.epoch != first.epoch) == (1, True)  # on the new one: fresh
    await eventually(lambda: worker.received.publications("c")[-1:] == [after])
    assert query(old.port, "ROLE")[0] == "master"  # still answering, as a master
    clients = query(old.port, "CLIENT", "LIST")
    assert "gateway:" not in clients, clients  # and nothing of the worker's is left there
