"""What only the Redis backend has to do (the shared contracts are tests/test_contract_*.py):
surviving a lost pub/sub connection or a Redis restart, failing fast while Redis is down,
its key layout, its connection pool, and its Lua scripts read once."""

from __future__ import annotations

import asyncio
import importlib.metadata
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources
from typing import Any, cast

import pytest
from redis.asyncio import Redis

from channels.backends import redis as redis_backend
from channels.backends.redis import Connection, RedisBroker, connection, pools, scripts
from channels.broker import BrokerOptions, BrokerUnavailable
from channels.publication import StreamPosition
from tests.conftest import eventually
from tests.contract import Received
from tests.helpers import poll
from tests.redis_server import RedisServer, evalsha_calls


class Worker:
    """One started Redis backend and what its handlers were given."""

    def __init__(self, url: str, options: BrokerOptions) -> None:
        self.backend = redis_backend.create(url, options)
        broker = self.backend.broker
        assert isinstance(broker, RedisBroker)
        self.broker = broker
        self.presence = self.backend.presence
        connection = broker.connection
        assert isinstance(connection, Connection)
        self.connection = connection
        self.connection.reconnect_base, self.connection.reconnect_cap = 0.02, 0.2  # quick tests
        self.received = Received()

    async def start(self) -> None:
        await self.broker.start(self.received.on_message, self.received.on_resync)

    @property
    def reconnects(self) -> int:
        return self.broker.reconnects


MakeWorker = Callable[..., Awaitable[Worker]]


async def kill_connections(admin: Redis, connection: Connection) -> int:
    """Close every connection of ``connection`` from the server side (a network blip)."""
    name = connection.client_name
    clients = [c for c in await admin.client_list() if c.get("name") == name]
    for client in clients:
        await admin.client_kill_filter(_id=client["id"])
    return len(clients)


@pytest.fixture
async def admin(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


def worker_factory(url: str, prefix: str) -> tuple[MakeWorker, list[Worker]]:
    opened: list[Worker] = []

    async def make(**options: Any) -> Worker:
        options.setdefault("key_prefix", prefix)
        worker = Worker(url, BrokerOptions(**options))
        opened.append(worker)
        await worker.start()
        return worker

    return make, opened


@pytest.fixture
async def start_worker(redis_server: RedisServer, redis_prefix: str) -> AsyncIterator[MakeWorker]:
    make, opened = worker_factory(redis_server.url, redis_prefix)
    yield make
    for worker in opened:
        await worker.broker.close()


@pytest.fixture
async def start_own_worker(
    own_redis_server: RedisServer, redis_prefix: str
) -> AsyncIterator[MakeWorker]:
    """Workers on this test's own redis-server (which the test may stop and restart)."""
    make, opened = worker_factory(own_redis_server.url, redis_prefix)
    yield make
    for worker in opened:
        await worker.broker.close()


async def test_subscribe_returns_once_redis_confirmed_it(
    start_worker: MakeWorker, admin: Redis, redis_prefix: str
) -> None:
    """Why it matters: a subscribe that returned before the SUBSCRIBE reached Redis would let
    a join miss what is published between it and the join's history read."""
    broker = (await start_worker()).broker
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
    start_worker: MakeWorker, admin: Redis
) -> None:
    subscriber = await start_worker()
    publisher = await start_worker()
    received = subscriber.received
    for channel in ("a", "b"):
        await subscriber.broker.subscribe(channel)
    await publisher.broker.publish("a", b"1")
    await eventually(lambda: len(received.publications("a")) == 1)

    assert await kill_connections(admin, subscriber.connection) >= 1
    await eventually(lambda: subscriber.reconnects == 1 and received.resyncs == 1)
    # Both channels are subscribed again: live publications flow.
    await publisher.broker.publish("a", b"2")
    await publisher.broker.publish("b", b"1")
    await eventually(lambda: len(received.publications("a")) == 2 and received.publications("b"))
    assert [p.offset for p in received.publications("a")] == [1, 2]
    assert await subscriber.broker.ready()


async def test_signals_are_heard_again_after_a_reconnect(
    start_worker: MakeWorker, admin: Redis
) -> None:
    """The signal topic is resubscribed with the channels: a cancel sent to a worker whose
    pub/sub connection was lost and came back still reaches it."""
    listener, sender = await start_worker(), await start_worker()
    heard: list[bytes] = []
    listener.backend.signals.listen(heard.append)
    assert await kill_connections(admin, listener.connection) >= 1
    await eventually(lambda: listener.reconnects == 1)
    await sender.backend.signals.signal(b"after")
    await eventually(lambda: heard == [b"after"])


async def test_redis_down_fails_fast_and_a_restart_resubscribes_and_resyncs(
    start_own_worker: MakeWorker, own_redis_server: RedisServer
) -> None:
    worker = await start_own_worker()
    broker, presence, signals = worker.broker, worker.presence, worker.backend.signals
    received = worker.received
    await broker.subscribe("c")
    first = await broker.publish("c", b"1")
    await eventually(lambda: received.publications("c"))

    own_redis_server.stop(save=True)
    await eventually(lambda: not worker.connection.connected)
    assert not await broker.ready()
    calls: list[Callable[[], Awaitable[Any]]] = [
        lambda: broker.publish("c", b"2"),
        lambda: broker.history("c"),
        lambda: presence.list("chat:c"),
        lambda: presence.add("chat:c", "c-1", b"{}"),
        lambda: presence.remove("chat:c", "c-1"),
        lambda: presence.expire("chat:c"),
        lambda: broker.publish_event("chat:c", "join", b"{}"),
        lambda: broker.has_subscribers("c"),
        lambda: signals.signal(b"{}"),
        lambda: signals.register("k", b"v", 1),
        lambda: signals.lookup("k"),
        lambda: signals.unregister("k"),
    ]
    for call in calls:
        started = time.monotonic()
        with pytest.raises(BrokerUnavailable):
            await call()
        assert time.monotonic() - started < 1.0
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable):
        await broker.subscribe("other")
    assert time.monotonic() - started < pools.CONNECT_TIMEOUT + 1

    own_redis_server.start()
    await eventually(lambda: worker.reconnects == 1 and received.resyncs == 1, timeout=10)
    assert await broker.ready()
    second = await broker.publish("c", b"2")  # the snapshot kept the channel's state
    assert (second.offset, second.epoch) == (2, first.epoch)
    await eventually(lambda: len(received.publications("c")) == 2)
    await broker.subscribe("other")  # nothing was left half-subscribed


async def test_a_promoted_replica_gives_what_the_old_master_wrote_a_new_epoch(
    own_redis_server: RedisServer, redis_prefix: str
) -> None:
    """Replication is asynchronous: what the master acknowledged last may never reach the
    replica that takes over. Its offsets must not be handed out again under the old epoch;
    a channel first written after the failover keeps its epoch."""
    master = own_redis_server
    replica = RedisServer().start()
    old, new = Worker(master.url, BrokerOptions(key_prefix=redis_prefix)), None
    try:
        master.command("CONFIG", "SET", "repl-diskless-sync-delay", "0")  # sync at once
        assert replica.command("REPLICAOF", "127.0.0.1", str(master.port)) == b"+OK"
        await old.start()
        before = [await old.broker.publish("c", b"%d" % i) for i in range(3)]
        # The replica has all three (it may still be connecting: WAIT again until it has).
        deadline = time.monotonic() + 10
        while master.command("WAIT", "1", "200") != b":1":
            assert time.monotonic() < deadline, "the replica did not catch up"
        assert replica.command("REPLICAOF", "NO", "ONE") == b"+OK"  # the failover
        lost = await old.broker.publish("c", b"lost")  # acknowledged by the old master only
        assert (lost.offset, lost.epoch) == (4, before[0].epoch)

        new = Worker(replica.url, BrokerOptions(key_prefix=redis_prefix))
        await new.start()
        page = await new.broker.history("c", since=before[-1].position)
        assert not page.complete and page.position.epoch != before[0].epoch
        after = await new.broker.publish("c", b"after")
        assert (after.offset, after.epoch) == (1, page.position.epoch)
        later = await new.broker.publish("d", b"1")
        assert (await new.broker.publish("d", b"2")).position == StreamPosition(2, later.epoch)
        assert (await new.broker.publish("c", b"again")).epoch == after.epoch
    finally:
        await old.broker.close()
        if new is not None:
            await new.broker.close()
        replica.close()


async def test_redis_restarted_empty_starts_a_new_epoch(
    start_own_worker: MakeWorker, own_redis_server: RedisServer
) -> None:
    worker = await start_own_worker()
    broker, received = worker.broker, worker.received
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
    worker = Worker(server.url, BrokerOptions(key_prefix=redis_prefix))
    broker, received = worker.broker, worker.received
    try:
        await worker.start()
        assert not await broker.ready()
        server.start()
        await eventually(lambda: worker.connection.connected, timeout=10)
        assert await broker.ready()
        await broker.subscribe("c")
        await broker.publish("c", b"1")
        await eventually(lambda: received.publications("c"))
        assert broker.reconnects == 0  # the first connection is not a reconnect
    finally:
        await broker.close()
        server.close()


async def test_a_silent_pubsub_connection_is_detected_by_ping(
    start_worker: MakeWorker, admin: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection that stays open but gets no answer (a network partition) is dropped."""
    monkeypatch.setattr(connection, "COMMAND_TIMEOUT", 0.5)
    worker = await start_worker()
    worker.connection.ping_interval = 0.2
    await worker.broker.subscribe("c")
    await admin.client_pause(1500, all=True)  # CLIENT PAUSE: every command, not just writes
    await eventually(lambda: worker.reconnects >= 1 and worker.received.resyncs >= 1, timeout=10)
    await worker.broker.publish("c", b"1")
    await eventually(lambda: worker.received.publications("c"))


async def test_keys_are_namespaced_hash_tagged_and_expire(
    start_worker: MakeWorker, admin: Redis, redis_prefix: str
) -> None:
    worker = await start_worker(history_ttl=60, history_meta_ttl=3600, presence_ttl=30)
    broker = worker.broker
    await broker.subscribe("chat:x")
    assert await admin.keys(f"{redis_prefix}*") == []  # subscribing stores nothing
    await broker.publish("chat:x", b"1")
    await worker.presence.add("chat:x", "c-1", b"{}")
    await broker.history("unknown:y")
    await worker.backend.signals.register("relay:s-1", b"gen:1", 20)
    # The admin client does not decode responses: the keys are bytes.
    keys = sorted(k.decode() for k in cast("list[bytes]", await admin.keys(f"{redis_prefix}*")))
    assert keys == [
        f"{redis_prefix}:h:{{chat:x}}",
        f"{redis_prefix}:m:{{chat:x}}",
        f"{redis_prefix}:m:{{unknown:y}}",
        f"{redis_prefix}:p:{{chat:x}}",
        f"{redis_prefix}:r:{{relay:s-1}}",
        f"{redis_prefix}:z:{{chat:x}}",
    ]
    ttl = {key: await admin.pttl(key) for key in keys}
    assert 59_000 < ttl[f"{redis_prefix}:h:{{chat:x}}"] <= 60_000
    assert 3_590_000 < ttl[f"{redis_prefix}:m:{{chat:x}}"] <= 3_600_000
    assert 3_590_000 < ttl[f"{redis_prefix}:m:{{unknown:y}}"] <= 3_600_000
    assert 29_000 < ttl[f"{redis_prefix}:p:{{chat:x}}"] <= 30_000
    assert 29_000 < ttl[f"{redis_prefix}:z:{{chat:x}}"] <= 30_000
    assert 19_000 < ttl[f"{redis_prefix}:r:{{relay:s-1}}"] <= 20_000
    entries = await admin.xrange(f"{redis_prefix}:h:{{chat:x}}")
    assert entries is not None and entries[0][0] == b"0-1"
    # Every worker's reader listens to the signal topic, whatever its channels.
    assert (await admin.pubsub_numsub(f"{redis_prefix}:signals"))[0][1] == 1


async def test_offsets_and_epoch_outlive_the_history(start_worker: MakeWorker) -> None:
    broker = (await start_worker(history_size=10, history_ttl=0.2, history_meta_ttl=60)).broker
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
    start_worker: MakeWorker, admin: Redis, redis_prefix: str
) -> None:
    broker = (await start_worker(history_size=0)).broker
    pubs = [await broker.publish("c", b"%d" % i) for i in range(3)]
    pubs += await broker.publish_many("c", [b"3", b"4"])
    assert [p.offset for p in pubs] == [1, 2, 3, 4, 5]
    assert not await admin.exists(f"{redis_prefix}:h:{{c}}")
    page = await broker.history("c", since=pubs[-1].position)
    assert page.complete and page.publications == []
    assert not (await broker.history("c", since=pubs[0].position)).complete


async def test_a_history_stream_left_without_its_meta_is_not_served(
    start_worker: MakeWorker, admin: Redis, redis_prefix: str
) -> None:
    """If Redis evicts the meta but not the stream, the old entries belong to a lost epoch."""
    broker = (await start_worker()).broker
    old = [await broker.publish("c", b"%d" % i) for i in range(3)]
    await admin.delete(f"{redis_prefix}:m:{{c}}")
    page = await broker.history("c")
    assert page.publications == [] and page.position.epoch != old[0].epoch
    new = await broker.publish("c", b"x")
    assert (new.offset, new.epoch) == (1, page.position.epoch)


def test_a_key_prefix_with_braces_is_refused() -> None:
    with pytest.raises(ValueError, match="prefix"):
        redis_backend.create("redis://127.0.0.1:1/0", BrokerOptions(key_prefix="a{b}"))


async def test_a_burst_bigger_than_the_pool_waits_for_connections(
    redis_server: RedisServer, redis_prefix: str, admin: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Thousands of clients reconnecting at once queue for the bounded pool; none fails."""
    monkeypatch.setattr(Connection, "pool_size", 3)  # the pub/sub connection and two more
    worker = Worker(redis_server.url, BrokerOptions(key_prefix=redis_prefix))
    broker = worker.broker
    await worker.start()
    try:
        await broker.subscribe("burst")
        published, _ = await asyncio.gather(
            asyncio.gather(*[broker.publish("burst", b"%d" % n) for n in range(200)]),
            asyncio.gather(*[broker.history("burst", limit=0) for _ in range(200)]),
        )
        offsets = sorted(r.offset for r in published)
        assert offsets == list(range(1, 201))
        name = f"gateway:{redis_prefix}"
        connections = [c for c in await admin.client_list() if c.get("name") == name]
        assert 1 < len(connections) <= 3
    finally:
        await broker.close()


async def test_each_lua_file_is_read_once_however_many_backends(
    monkeypatch: pytest.MonkeyPatch, redis_prefix: str
) -> None:
    """The scripts are read from the package's .lua files (so an installed wheel needs
    them: pyproject.toml's package-data) once per process, not once per backend."""
    scripts.source.cache_clear()
    scripts._part.cache_clear()
    reads: Counter[str] = Counter()
    read_file = scripts._read_file

    def counting(name: str) -> str:
        reads[name] += 1
        return read_file(name)

    monkeypatch.setattr(scripts, "_read_file", counting)
    backends = [
        redis_backend.create("redis://127.0.0.1:1/0", BrokerOptions(key_prefix=redis_prefix))
        for _ in range(3)
    ]
    package = resources.files("channels.backends.redis")
    lua_files = {entry.name for entry in package.iterdir() if entry.name.endswith(".lua")}
    assert dict(reads) == dict.fromkeys(lua_files, 1)
    shas = {b.broker._scripts.publish.sha for b in backends}  # type: ignore[attr-defined]
    assert len(shas) == 1
    for backend in backends:
        await backend.broker.close()


async def test_publish_many_is_one_script_call_and_one_pubsub_message(
    start_worker: MakeWorker, admin: Redis, redis_prefix: str
) -> None:
    """The batch format of keys.py, byte for byte; a single one keeps the ``p`` format."""
    broker = (await start_worker()).broker
    await broker.publish_many("c", [b"w", b"arm"])  # the script is loaded from here on
    topic = f"{redis_prefix}:t:{{c}}"
    listener = admin.pubsub()
    await listener.subscribe(topic)
    try:
        confirmed = await listener.get_message(timeout=5)
        assert confirmed is not None and confirmed["type"] == "subscribe"
        calls = await evalsha_calls(admin)
        pubs = await broker.publish_many("c", [b"1", b'{"a": 2}', b'"three"'])
        assert await evalsha_calls(admin) == calls + 1
        (one,) = await broker.publish_many("c", [b"4"])
        message = await listener.get_message(timeout=5)
        assert message is not None
        stamp = f"{pubs[0].published_at:.6f}".encode()
        epoch = pubs[0].epoch.encode()
        assert message["data"] == b'b3 %s %s 1,8,7 1{"a": 2}"three"' % (epoch, stamp)
        message = await listener.get_message(timeout=5)
        assert message is not None
        stamp = f"{one.published_at:.6f}".encode()
        assert message["data"] == b"p6 %s %s 4" % (epoch, stamp)
    finally:
        await listener.aclose()  # type: ignore[no-untyped-call]


async def test_publish_each_is_one_pipeline_and_survives_a_flushed_script_cache(
    start_worker: MakeWorker, admin: Redis
) -> None:
    broker = (await start_worker()).broker
    await broker.publish("warm", b"0")  # the script is loaded
    calls = await evalsha_calls(admin)
    pubs = await broker.publish_each(["a", "b", "c"], b"1")
    assert [p.offset for p in pubs] == [1, 1, 1]
    assert await evalsha_calls(admin) == calls + 3  # no SCRIPT EXISTS, no retry
    await admin.script_flush()  # as after a Redis restart: EVALSHA answers NOSCRIPT
    again = await broker.publish_each(["a", "b", "c"], b"2")
    assert [p.offset for p in again] == [2, 2, 2]  # sent again once loaded, not twice
    assert [p.offset for p in (await broker.history("a")).publications] == [1, 2]


async def test_history_reads_of_one_loop_turn_go_in_one_pipeline(
    start_worker: MakeWorker, admin: Redis
) -> None:
    """A crowd of subscribes to channels new to the worker reads each channel's position:
    the reads of one loop turn go to Redis together, on one connection (``batched``),
    each caller with its own channel's answer; after a flushed script cache (a Redis
    restart) the script is loaded and the reads answered all the same."""
    worker = await start_worker()
    broker = worker.broker
    channels = [f"c{n}" for n in range(8)]
    for n, channel in enumerate(channels):
        for _ in range(n):  # channel cN has N publications
            await broker.publish(channel, b"x")
    await broker.history("warm", limit=0)  # the script is loaded
    name = worker.connection.client_name

    async def connections() -> int:
        return len([c for c in await admin.client_list() if c.get("name") == name])

    held = await connections()  # the pub/sub reader's, and one the publishes took in turn
    calls = await evalsha_calls(admin)
    pages = await asyncio.gather(*(broker.history(c, limit=0) for c in channels))
    assert [page.position.offset for page in pages] == list(range(8))
    assert await evalsha_calls(admin) == calls + 8
    assert await connections() == held  # one at a time each would have taken its own
    await admin.script_flush()
    pages = await asyncio.gather(*(broker.history(c) for c in channels))
    assert [len(page.publications) for page in pages] == list(range(8))


async def test_a_history_read_cancelled_in_its_batch_leaves_the_others_answered(
    start_worker: MakeWorker,
) -> None:
    broker = (await start_worker()).broker
    for channel in ("a", "b", "b"):
        await broker.publish(channel, b"x")
    left = asyncio.ensure_future(broker.history("a", limit=0))
    kept = asyncio.ensure_future(broker.history("b", limit=0))
    await asyncio.sleep(0)  # both wait in the same batch, not sent yet
    left.cancel()
    assert (await kept).position.offset == 2
    with pytest.raises(asyncio.CancelledError):
        await left


async def test_history_reads_in_a_batch_fail_cleanly_when_the_broker_closes(
    start_worker: MakeWorker,
) -> None:
    broker = (await start_worker()).broker
    waiting = asyncio.ensure_future(broker.history("a", limit=0))
    await asyncio.sleep(0)  # in the batch, not sent yet
    await broker.close()
    with pytest.raises(BrokerUnavailable):
        await asyncio.wait_for(waiting, 5)


async def test_new_connections_do_not_read_the_package_metadata(
    start_worker: MakeWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """redis-py left to itself reads and parses its package metadata for every new
    connection (~0.3 ms each); the pools give it the driver info instead (``pools``)."""

    def read(name: str) -> str:
        raise AssertionError(f"package metadata of {name!r} read for a new connection")

    monkeypatch.setattr(importlib.metadata, "version", read)
    worker = await start_worker()  # the pub/sub reader's connection
    await worker.start()
    # Concurrent commands: the pool opens a connection each.
    pubs = await asyncio.gather(*(worker.broker.publish(f"c{n}", b"x") for n in range(6)))
    assert [p.offset for p in pubs] == [1] * 6


async def test_a_malformed_batch_message_is_logged_and_dropped(
    start_worker: MakeWorker,
    admin: Redis,
    redis_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    worker = await start_worker()
    await worker.broker.subscribe("c")
    topic = f"{redis_prefix}:t:{{c}}"
    await admin.publish(topic, b"b1 e0 1.5 2,2 abc")  # the lengths do not add up
    await admin.publish(topic, b"b1 e0 1.5 abc")  # no lengths
    await admin.publish(topic, b"b1 e0 1.5 1,2 abc")
    got = await eventually(lambda: worker.received.publications("c"))
    assert [(p.offset, p.epoch, p.data, p.published_at) for p in got] == [
        (1, "e0", b"a", 1.5),
        (2, "e0", b"bc", 1.5),
    ]
    malformed = [r for r in caplog.records if "malformed message" in r.getMessage()]
    assert len(malformed) == 2


def test_every_script_that_reads_the_stream_starts_with_its_meta() -> None:
    """``stream_meta.lua`` sets ``epoch`` and ``top`` (and starts a new epoch after a
    failover): the scripts of a channel's stream must begin with it."""
    for name in ("publish", "publish_many", "history"):
        assert scripts.PARTS[name][0] == "stream_meta.lua", name
