"""The ``Broker`` contract, run unchanged over every backend (tests/contract.py): offsets,
history, fan-out to the workers subscribed to a channel."""

from __future__ import annotations

import asyncio
import time

import pytest

from channels.broker import Broker
from channels.publication import StreamPosition
from tests.conftest import eventually
from tests.contract import MakeWorker, Received, Worker
from tests.helpers import poll


@pytest.fixture
async def worker(make_worker: MakeWorker) -> Worker:
    return await make_worker(history_size=5)


@pytest.fixture
def broker(worker: Worker) -> Broker:
    return worker.broker


@pytest.fixture
def received(worker: Worker) -> Received:
    return worker.received


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


async def test_workers_share_one_gapless_sequence_and_all_see_it_in_order(
    make_worker: MakeWorker,
) -> None:
    workers = [await make_worker() for _ in range(3)]
    for worker in workers:
        await worker.broker.subscribe("c")

    async def publish_many(worker: Worker, n: int) -> list[int]:
        return [(await worker.broker.publish("c", b"%d" % i)).offset for i in range(n)]

    results = await asyncio.gather(*(publish_many(w, 200) for w in workers))
    assigned = sorted(offset for offsets in results for offset in offsets)
    assert assigned == list(range(1, 601))
    for worker in workers:
        sink = worker.received

        def got_all(sink: Received = sink) -> bool:
            return len(sink.publications("c")) == 600

        await eventually(got_all)
        assert [p.offset for p in sink.publications("c")] == list(range(1, 601))
        assert len({p.epoch for p in sink.publications("c")}) == 1
        assert (await worker.broker.history("c", limit=1)).position.offset == 600


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


async def test_presence_events_reach_every_subscribed_worker_but_are_not_stored(
    make_worker: MakeWorker, broker: Broker, received: Received
) -> None:
    other = await make_worker()
    await broker.subscribe("chat:x")
    await other.broker.subscribe("chat:x")
    await broker.publish_event("chat:x", "join", b'{"client":"c-1","user":"u","info":{}}')
    for sink in (received, other.received):
        events = await eventually(sink.events)
        assert [(e.channel, e.event) for e in events] == [("chat:x", "join")]
        assert events[0].client == b'{"client":"c-1","user":"u","info":{}}'
    assert (await broker.history("chat:x")).publications == []


async def test_history_expires_after_the_ttl(make_worker: MakeWorker) -> None:
    broker = (await make_worker(history_size=5, history_ttl=0.3)).broker
    await broker.publish("c", b"1")
    assert len((await broker.history("c")).publications) == 1
    deadline = asyncio.get_running_loop().time() + 5
    while (await broker.history("c")).publications:
        assert asyncio.get_running_loop().time() < deadline, "history did not expire"
        await asyncio.sleep(0.05)


async def test_ready_is_true_when_connected_and_nothing_reconnected(broker: Broker) -> None:
    assert await broker.ready()
    assert broker.reconnects == 0


async def test_close_is_idempotent(make_worker: MakeWorker) -> None:
    broker = (await make_worker()).broker
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


async def test_has_subscribers_follows_subscribe_and_unsubscribe(broker: Broker) -> None:
    assert not await broker.has_subscribers("watched")
    await broker.subscribe("watched")
    assert await broker.has_subscribers("watched")
    await broker.unsubscribe("watched")
    deadline = asyncio.get_running_loop().time() + 5
    while await broker.has_subscribers("watched"):
        assert asyncio.get_running_loop().time() < deadline, "still subscribed"
        await asyncio.sleep(0.02)


async def test_has_subscribers_counts_every_worker(make_worker: MakeWorker) -> None:
    here, there = await make_worker(), await make_worker()
    await there.broker.subscribe("watched")
    assert await here.broker.has_subscribers("watched")
    await there.broker.close()  # a worker that is gone subscribes to nothing
    deadline = asyncio.get_running_loop().time() + 5
    while await here.broker.has_subscribers("watched"):
        assert asyncio.get_running_loop().time() < deadline, "still subscribed"
        await asyncio.sleep(0.02)


# -- publish_many --------------------------------------------------------------------


async def test_publish_many_assigns_consecutive_offsets_in_list_order(broker: Broker) -> None:
    before = await broker.publish("c", b"0")
    pubs = await broker.publish_many("c", [b'{"n":%d}' % i for i in range(1, 8)])
    assert [p.offset for p in pubs] == list(range(2, 9))
    assert [p.data for p in pubs] == [b'{"n":%d}' % i for i in range(1, 8)]
    assert {p.epoch for p in pubs} == {before.epoch}
    assert [p.channel for p in pubs] == ["c"] * 7
    after = await broker.publish("c", b"9")
    assert after.offset == 9
    assert await broker.publish_many("c", []) == []
    (one,) = await broker.publish_many("c", [b"10"])
    assert (one.offset, one.data) == (10, b"10")


async def test_publish_many_stores_each_in_history_keeping_the_last_history_size(
    broker: Broker,
) -> None:
    """history_size is 5 here: a batch longer than that leaves its last five, exactly as
    seven separate publishes would."""
    await broker.publish_many("c", [b"%d" % i for i in range(1, 4)])
    page = await broker.history("c")
    assert [(p.offset, p.data) for p in page.publications] == [(1, b"1"), (2, b"2"), (3, b"3")]
    pubs = await broker.publish_many("c", [b"%d" % i for i in range(4, 11)])
    page = await broker.history("c")
    assert [(p.offset, p.data) for p in page.publications] == [(i, b"%d" % i) for i in range(6, 11)]
    assert page.position == pubs[-1].position
    stored = await broker.history("c", since=StreamPosition(7, pubs[0].epoch))
    assert stored.complete and [p.offset for p in stored.publications] == [8, 9, 10]
    assert [p.published_at for p in stored.publications] == pytest.approx(
        [p.published_at for p in pubs[-3:]], abs=1e-5
    )
    assert not (await broker.history("c", since=StreamPosition(4, pubs[0].epoch))).complete


async def test_publish_many_reaches_every_subscribed_worker_once_in_order(
    make_worker: MakeWorker,
) -> None:
    here, there = await make_worker(), await make_worker()
    for worker in (here, there):
        await worker.broker.subscribe("c")
    await here.broker.publish("c", b"first")
    await here.broker.publish_many("c", [b"%d" % i for i in range(2, 102)])
    await there.broker.publish_many("c", [b"a", b"b"])
    await there.broker.publish("c", b"last")
    expected = [b"first", *(b"%d" % i for i in range(2, 102)), b"a", b"b", b"last"]
    for worker in (here, there):
        sink = worker.received

        def got_all(sink: Received = sink) -> bool:
            return len(sink.publications("c")) >= len(expected)

        await eventually(got_all)
        got = sink.publications("c")
        assert [p.data for p in got] == expected
        assert [p.offset for p in got] == list(range(1, len(expected) + 1))


async def test_publish_many_of_an_unknown_channel_keeps_the_epoch_a_history_read_gave(
    broker: Broker, received: Received
) -> None:
    await broker.subscribe("fresh")
    first = await broker.history("fresh")
    pubs = await broker.publish_many("fresh", [b"1", b"2", b"3"])
    epoch = first.position.epoch
    assert [p.position for p in pubs] == [StreamPosition(i, epoch) for i in (1, 2, 3)]
    await eventually(lambda: len(received.publications("fresh")) == 3)
    assert [p.position for p in received.publications("fresh")] == [p.position for p in pubs]
    assert [p.published_at for p in received.publications("fresh")] == pytest.approx(
        [p.published_at for p in pubs], abs=1e-5
    )


async def test_concurrent_publish_many_and_publish_interleave_without_gaps(
    make_worker: MakeWorker,
) -> None:
    """Each batch's offsets stay consecutive whatever runs at the same time."""
    workers = [await make_worker() for _ in range(2)]
    await workers[0].broker.subscribe("c")

    async def batches(worker: Worker, tag: bytes) -> list[list[int]]:
        out = []
        for n in range(20):
            datas = [b"%s%d.%d" % (tag, n, i) for i in range(n % 4 + 1)]
            out.append([p.offset for p in await worker.broker.publish_many("c", datas)])
        return out

    async def singles(worker: Worker) -> list[list[int]]:
        return [[(await worker.broker.publish("c", b"s%d" % n)).offset] for n in range(30)]

    results = await asyncio.gather(
        batches(workers[0], b"x"), batches(workers[1], b"y"), singles(workers[1])
    )
    runs = [run for result in results for run in result]
    for run in runs:
        assert run == list(range(run[0], run[0] + len(run)))
    total = sum(len(run) for run in runs)
    assert sorted(offset for run in runs for offset in run) == list(range(1, total + 1))
    sink = workers[0].received
    await eventually(lambda: len(sink.publications("c")) == total)
    assert [p.offset for p in sink.publications("c")] == list(range(1, total + 1))


async def test_publish_each_publishes_the_data_to_each_channel_in_order(
    make_worker: MakeWorker,
) -> None:
    here, there = await make_worker(), await make_worker()
    await there.broker.subscribe("a")
    await there.broker.subscribe("b")
    await here.broker.publish("b", b"before")
    names = ["a", "b", "c", "a"]
    pubs = await here.broker.publish_each(names, b'{"n": 1}')
    assert [(p.channel, p.offset) for p in pubs] == [("a", 1), ("b", 2), ("c", 1), ("a", 2)]
    assert {p.data for p in pubs} == {b'{"n": 1}'}
    assert pubs[0].epoch == pubs[3].epoch
    await eventually(lambda: len(there.received.publications("a")) == 2)
    await eventually(lambda: len(there.received.publications("b")) == 2)
    assert [p.offset for p in (await here.broker.history("c")).publications] == [1]
    assert await here.broker.publish_each([], b"1") == []


async def test_publish_once_publishes_a_key_once_per_channel_across_workers(
    make_worker: MakeWorker,
) -> None:
    """An idempotency key: the first publish with it publishes; a repeat (from any worker,
    or several at once) gets the first one's offset and epoch and publishes nothing; the
    same key on another channel is another key; it is forgotten after the ttl."""
    here, there = await make_worker(idempotency_ttl=1.0), await make_worker(idempotency_ttl=1.0)
    await there.broker.subscribe("c")
    first, new = await here.broker.publish_once("c", b'{"n": 1}', "k-1")
    assert new and (first.offset, first.data) == (1, b'{"n": 1}')
    again, new = await there.broker.publish_once("c", b'{"n": 2}', "k-1")
    assert not new and (again.offset, again.epoch) == (first.offset, first.epoch)
    racing = await asyncio.gather(*(here.broker.publish_once("c", b"3", "k-2") for _ in range(5)))
    assert [new for _, new in racing].count(True) == 1
    assert {p.offset for p, _ in racing} == {2}
    other, new = await here.broker.publish_once("other", b"4", "k-1")
    assert new and other.offset == 1
    for channel, key in [("x", "b:c"), ("x:b", "c")]:  # a key is the channel's and its own
        publication, new = await here.broker.publish_once(channel, b"7", key)
        assert new and publication.offset == 1, (channel, key)
    plain = await here.broker.publish("c", b"5")
    assert plain.offset == 3
    await eventually(lambda: len(there.received.publications("c")) == 3)
    assert [p.data for p in (await here.broker.history("c")).publications] == [
        b'{"n": 1}',
        b"3",
        b"5",
    ]
    assert [p.offset for p in there.received.publications("c")] == [1, 2, 3]

    async def republished() -> bool:  # forgotten after the ttl: published again
        publication, new = await here.broker.publish_once("c", b"6", "k-1")
        assert new or publication.offset == 1
        return new

    await poll(republished, timeout=10, interval=0.1)
