"""One contract suite for every broker backend (parametrized), as uvicorn does for its
WebSocket implementations. Each test gets a fresh broker with a unique key prefix."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from channels.broker import Broker, BrokerOptions, create_broker
from channels.publication import Message, PresenceEvent, Publication, StreamPosition
from tests.conftest import eventually

BACKENDS = ["memory"]


class Received:
    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.resyncs = 0

    def on_message(self, message: Message) -> None:
        self.messages.append(message)

    def on_resync(self) -> None:
        self.resyncs += 1

    def publications(self, channel: str) -> list[Publication]:
        return [m for m in self.messages if isinstance(m, Publication) and m.channel == channel]


@pytest.fixture(params=BACKENDS)
def backend_url(request: pytest.FixtureRequest) -> str:
    assert request.param == "memory"
    return "memory://"


@pytest.fixture
async def received() -> Received:
    return Received()


async def open_broker(url: str, received: Received, **options: object) -> Broker:
    broker = create_broker(url, BrokerOptions(**options))  # type: ignore[arg-type]
    await broker.start(received.on_message, received.on_resync)
    return broker


@pytest.fixture
async def broker(backend_url: str, received: Received) -> AsyncIterator[Broker]:
    broker = await open_broker(backend_url, received, history_size=5)
    yield broker
    await broker.close()


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
    await broker.presence_add("chat:x", "c-1", b'{"client":"c-1"}')
    await broker.presence_add("chat:x", "c-2", b'{"client":"c-2"}')
    await broker.presence_add("chat:x", "c-2", b'{"client":"c-2"}')  # refresh, not a duplicate
    assert sorted(await broker.presence("chat:x")) == [b'{"client":"c-1"}', b'{"client":"c-2"}']
    await broker.presence_remove("chat:x", "c-1")
    assert await broker.presence("chat:x") == [b'{"client":"c-2"}']
    assert await broker.presence("chat:empty") == []


async def test_history_expires_after_the_ttl(backend_url: str, received: Received) -> None:
    broker = await open_broker(backend_url, received, history_size=5, history_ttl=0.3)
    try:
        await broker.publish("c", b"1")
        assert len((await broker.history("c")).publications) == 1
        deadline = asyncio.get_running_loop().time() + 5
        while (await broker.history("c")).publications:
            assert asyncio.get_running_loop().time() < deadline, "history did not expire"
            await asyncio.sleep(0.05)
    finally:
        await broker.close()


async def test_ready_is_true_when_connected(broker: Broker) -> None:
    assert await broker.ready()
