"""One contract suite for every broker backend (parametrized), as uvicorn does for its
WebSocket implementations. Each test gets a fresh broker with a unique key prefix; the
Redis backend runs against a real redis-server (tests/redis_server.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from channels.broker import Broker, BrokerOptions, create_broker
from channels.publication import Message, PresenceEvent, Publication, StreamPosition
from tests.conftest import eventually
from tests.redis_server import RedisServer

BACKENDS = ["memory", "redis"]


class Received:
    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.resyncs = 0
        self.signals: list[bytes] = []

    def on_message(self, message: Message) -> None:
        self.messages.append(message)

    def on_resync(self) -> None:
        self.resyncs += 1

    def on_signal(self, data: bytes) -> None:
        self.signals.append(data)

    def publications(self, channel: str) -> list[Publication]:
        return [m for m in self.messages if isinstance(m, Publication) and m.channel == channel]


@pytest.fixture(params=BACKENDS)
def backend_url(request: pytest.FixtureRequest) -> str:
    if request.param == "memory":
        return "memory://"
    assert request.param == "redis"
    server: RedisServer = request.getfixturevalue("redis_server")
    return server.url


@pytest.fixture
async def received() -> Received:
    return Received()


MakeBroker = Callable[..., Awaitable[Broker]]


@pytest.fixture
async def make_broker(backend_url: str, redis_prefix: str) -> AsyncIterator[MakeBroker]:
    """Started brokers of this test's backend, all on one key prefix (like workers of one
    deployment), closed at teardown."""
    opened: list[Broker] = []

    async def make(received: Received | None = None, **options: Any) -> Broker:
        options.setdefault("key_prefix", redis_prefix)
        broker = create_broker(backend_url, BrokerOptions(**options))
        sink = received or Received()
        await broker.start(sink.on_message, sink.on_resync, sink.on_signal)
        opened.append(broker)
        return broker

    yield make
    for broker in opened:
        await broker.close()


@pytest.fixture
async def broker(make_broker: MakeBroker, received: Received) -> Broker:
    return await make_broker(received, history_size=5)


async def test_offsets_start_at_one_and_have_no_gaps(broker: Broker) -> None:
    pubs = [await broker.publish("c", b'{"n":%d}' % i) for i in range(10)]
    assert [p.offset for p in pubs] == list(range(1, 11))
    assert len({p.epoch for p in pubs}) == 1
    assert pubs[3].data == b'{"n":3}'


async def test_channels_have_independent_offsets(broker: Broker) -> None:
    await broker.publish("a", b"1")
    await broker.publish("a", b"2")
    assert (await broker.publish("b", b"1")).offset == 1


async def test_history_keeps_the_last_history_size_publications(broker: Broker) -> None:
    for i in range(8):
        await broker.publish("c", b"%d" % i)
    page = await broker.history("c")
    assert [p.offset for p in page.publications] == [4, 5, 6, 7, 8]
    assert page.position.offset == 8
    last_two = await broker.history("c", limit=2)
    assert [p.offset for p in last_two.publications] == [7, 8]
    assert (await broker.history("c", limit=0)).publications == []


async def test_history_since_returns_what_follows_a_position(broker: Broker) -> None:
    pubs = [await broker.publish("c", b"%d" % i) for i in range(8)]
    epoch = pubs[0].epoch
    page = await broker.history("c", since=StreamPosition(5, epoch))
    assert page.complete and [p.offset for p in page.publications] == [6, 7, 8]
    page = await broker.history("c", since=StreamPosition(3, epoch))
    assert page.complete and [p.offset for p in page.publications] == [4, 5, 6, 7, 8]
    page = await broker.history("c", since=StreamPosition(3, epoch), limit=2)
    assert page.complete and [p.offset for p in page.publications] == [4, 5]
    page = await broker.history("c", since=StreamPosition(8, epoch))
    assert page.complete and page.publications == []


async def test_history_since_outside_the_window_or_epoch_is_incomplete(broker: Broker) -> None:
    pubs = [await broker.publish("c", b"%d" % i) for i in range(8)]
    epoch = pubs[0].epoch
    assert not (await broker.history("c", since=StreamPosition(2, epoch))).complete
    assert not (await broker.history("c", since=StreamPosition(5, epoch + "x"))).complete
    assert not (await broker.history("c", since=StreamPosition(9, epoch))).complete


async def test_an_unknown_channel_is_at_offset_zero_with_a_stable_epoch(broker: Broker) -> None:
    first = await broker.history("fresh")
    assert first.position.offset == 0 and first.publications == []
    publication = await broker.publish("fresh", b"1")
    assert publication.epoch == first.position.epoch
    page = await broker.history("fresh", since=first.position)
    assert page.complete and [p.offset for p in page.publications] == [1]


async def test_subscribed_channels_reach_the_handler_in_order(
    broker: Broker, received: Received
) -> None:
    await broker.subscribe("c")
    await asyncio.gather(*(broker.publish("c", b"%d" % i) for i in range(50)))
    await broker.publish("other", b"x")
    await eventually(lambda: len(received.publications("c")) == 50)
    assert [p.offset for p in received.publications("c")] == list(range(1, 51))
    assert received.publications("other") == []


async def test_unsubscribe_stops_delivery(broker: Broker, received: Received) -> None:
    await broker.subscribe("c")
    await broker.publish("c", b"1")
    await eventually(lambda: len(received.publications("c")) == 1)
    await broker.unsubscribe("c")
    await broker.subscribe("d")
    await broker.publish("c", b"2")
    await broker.publish("d", b"1")
    await eventually(lambda: received.publications("d"))
    assert len(received.publications("c")) == 1


async def test_presence_events_are_delivered_but_not_stored(
    broker: Broker, received: Received
) -> None:
    await broker.subscribe("chat:x")
    await broker.publish_event("chat:x", "join", b'{"client":"c-1","user":"u","info":{}}')
    events = await eventually(
        lambda: [m for m in received.messages if isinstance(m, PresenceEvent)]
    )
    assert events[0].event == "join" and events[0].channel == "chat:x"
    assert (await broker.history("chat:x")).publications == []


async def test_presence_entries_are_added_listed_and_removed(broker: Broker) -> None:
    assert await broker.presence_add("chat:x", "c-1", b'{"client":"c-1"}') is True
    assert await broker.presence_add("chat:x", "c-2", b'{"client":"c-2"}') is True
    # A refresh, not a duplicate: False says the entry was there.
    assert await broker.presence_add("chat:x", "c-2", b'{"client":"c-2"}') is False
    assert sorted(await broker.presence("chat:x")) == [b'{"client":"c-1"}', b'{"client":"c-2"}']
    await broker.presence_remove("chat:x", "c-1")
    assert await broker.presence("chat:x") == [b'{"client":"c-2"}']
    assert await broker.presence("chat:empty") == []


async def test_history_expires_after_the_ttl(make_broker: MakeBroker) -> None:
    broker = await make_broker(history_size=5, history_ttl=0.3)
    await broker.publish("c", b"1")
    assert len((await broker.history("c")).publications) == 1
    deadline = asyncio.get_running_loop().time() + 5
    while (await broker.history("c")).publications:
        assert asyncio.get_running_loop().time() < deadline, "history did not expire"
        await asyncio.sleep(0.05)


async def test_ready_is_true_when_connected(broker: Broker) -> None:
    assert await broker.ready()


async def test_close_is_idempotent(make_broker: MakeBroker) -> None:
    broker = await make_broker()
    await broker.close()
    await broker.close()


async def test_a_publication_carries_the_publishers_timestamp(
    broker: Broker, received: Received
) -> None:
    await broker.subscribe("c")
    before = time.time()
    publication = await broker.publish("c", b"1")
    assert before <= publication.published_at <= time.time()
    delivered = await eventually(lambda: received.publications("c"))
    assert delivered[0].published_at == pytest.approx(publication.published_at, abs=1e-5)
    (stored,) = (await broker.history("c")).publications
    assert stored.published_at == pytest.approx(publication.published_at, abs=1e-5)
    assert (stored.offset, stored.epoch, stored.data) == (1, publication.epoch, b"1")


async def test_channel_names_with_colons_do_not_collide(broker: Broker) -> None:
    names = ["a", "a:b", "a:b:c", "b:a", "a.b", "a:", ":a"]
    for i, name in enumerate(names):
        for _ in range(i + 1):
            await broker.publish(name, b'"%s"' % name.encode())
    for i, name in enumerate(names):
        page = await broker.history(name)
        assert page.position.offset == i + 1
        assert {p.data for p in page.publications} == {b'"%s"' % name.encode()}


async def test_presence_and_join_events_are_per_channel(broker: Broker, received: Received) -> None:
    await broker.subscribe("chat:a")
    await broker.presence_add("chat:a", "c-1", b'{"client":"c-1"}')
    await broker.publish_event("chat:b", "join", b'{"client":"c-2"}')
    await broker.publish_event("chat:a", "leave", b'{"client":"c-1"}')
    events = await eventually(
        lambda: [m for m in received.messages if isinstance(m, PresenceEvent)]
    )
    assert [(e.channel, e.event, e.client) for e in events] == [
        ("chat:a", "leave", b'{"client":"c-1"}')
    ]
    assert await broker.presence("chat:b") == []


async def test_has_subscribers_follows_subscribe_and_unsubscribe(broker: Broker) -> None:
    assert not await broker.has_subscribers("watched")
    await broker.subscribe("watched")
    assert await broker.has_subscribers("watched")
    await broker.unsubscribe("watched")
    deadline = asyncio.get_running_loop().time() + 5
    while await broker.has_subscribers("watched"):
        assert asyncio.get_running_loop().time() < deadline, "still subscribed"
        await asyncio.sleep(0.02)


async def test_a_signal_reaches_every_started_broker_but_no_channel(
    make_broker: MakeBroker, backend_url: str
) -> None:
    here, there = Received(), Received()
    a = await make_broker(here)
    await a.subscribe("c")
    workers = [here]
    if not backend_url.startswith("memory"):  # one process: no other worker to reach
        await make_broker(there)
        workers.append(there)
    await a.signal(b'{"op":"x","n":1}')
    await a.signal(b'{"op":"x","n":2}')
    for worker in workers:
        await eventually(lambda w=worker: len(w.signals) == 2)  # type: ignore[misc]
        assert worker.signals == [b'{"op":"x","n":1}', b'{"op":"x","n":2}']
    assert here.messages == [] and there.messages == []


async def test_registry_keys_are_shared_refreshed_and_expire(
    make_broker: MakeBroker, backend_url: str
) -> None:
    a = await make_broker()
    b = a if backend_url.startswith("memory") else await make_broker()
    assert await b.lookup("relay:s-1") is None
    await a.register("relay:s-1", b"gen:1", 0.4)
    assert await b.lookup("relay:s-1") == b"gen:1"
    await a.register("relay:s-2", b"gen:2", 60)
    await a.unregister("relay:s-2")
    assert await b.lookup("relay:s-2") is None
    await a.register("relay:s-1", b"gen:1", 60)  # refreshed: outlives the first ttl
    await asyncio.sleep(0.5)  # past the first ttl: what is asserted is that it is still there
    assert await b.lookup("relay:s-1") == b"gen:1"
    await a.register("relay:s-1", b"gen:1", 0.2)
    deadline = asyncio.get_running_loop().time() + 5
    while await b.lookup("relay:s-1") is not None:
        assert asyncio.get_running_loop().time() < deadline, "the key did not expire"
        await asyncio.sleep(0.05)


async def test_expired_presence_entries_leave_once_with_a_leave_event(
    make_broker: MakeBroker, backend_url: str
) -> None:
    """A worker that died stops refreshing its clients' entries: once their TTL passed,
    whichever worker expires them first announces each ``leave``, exactly once."""
    watcher = Received()
    a = await make_broker(watcher, presence_ttl=0.3)
    await a.subscribe("chat:x")
    entry = b'{"client":"c-1","user":"gone","info":{}}'
    await a.presence_add("chat:x", "c-1", entry)
    await a.presence_add("chat:x", "c-2", b'{"client":"c-2","user":"kept","info":{}}')
    if backend_url.startswith("memory"):
        # One process: nothing outlives its worker, so nothing expires.
        await asyncio.sleep(0.4)  # past the TTL: what is asserted is that nothing went
        await a.presence_expire("chat:x")
        assert len(await a.presence("chat:x")) == 2
        return
    b, c = await make_broker(presence_ttl=0.3), await make_broker(presence_ttl=0.3)
    deadline = asyncio.get_running_loop().time() + 5
    while True:  # keep c-2 refreshed (its worker is alive) until c-1 has expired
        await a.presence_add("chat:x", "c-2", b'{"client":"c-2","user":"kept","info":{}}')
        await asyncio.gather(b.presence_expire("chat:x"), c.presence_expire("chat:x"))
        if [m for m in watcher.messages if isinstance(m, PresenceEvent)]:
            break
        assert asyncio.get_running_loop().time() < deadline, "the entry never expired"
        await asyncio.sleep(0.05)
    await a.publish("chat:x", b"1")  # a marker: everything published before it has arrived
    await eventually(lambda: watcher.publications("chat:x"))
    leaves = [m for m in watcher.messages if isinstance(m, PresenceEvent)]
    assert [(m.event, m.client) for m in leaves] == [("leave", entry)]
    assert await a.presence("chat:x") == [b'{"client":"c-2","user":"kept","info":{}}']
