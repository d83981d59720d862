"""Publishes to one channel that meet share a broker call (``channels.coalescer``).

Over every backend (``make_worker``, tests/contract.py): a real broker behind a thin
wrapper that records each call it passes on and can hold calls at a gate, so that a
test decides what is in flight while others queue, without timing. Faults are real
too: a Redis server stopped under the calls. ``Hub.publish`` itself is checked against
Redis's own count of script calls (``INFO commandstats``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from channels.backend_url import create_backend
from channels.broker import Broker, BrokerOptions, BrokerUnavailable
from channels.coalescer import Coalescer, batches
from channels.hub import Hub
from channels.publication import Publication
from tests.conftest import eventually
from tests.contract import MakeWorker, Received
from tests.redis_server import RedisServer, script_calls


class Gated:
    """A real broker whose publish calls are recorded (the number of publications of each)
    and, while ``hold`` is on, wait at a gate of their own until ``release``."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.calls: list[int] = []
        self.hold = False
        self.gates: list[asyncio.Event] = []  # one per held call, in call order

    async def _pass(self, count: int) -> None:
        self.calls.append(count)
        if self.hold:
            gate = asyncio.Event()
            self.gates.append(gate)
            await gate.wait()

    def release(self, call: int = -1) -> None:
        self.gates[call].set()

    async def publish(self, channel: str, data: bytes) -> Publication:
        await self._pass(1)
        return await self.broker.publish(channel, data)

    async def publish_many(self, channel: str, datas: list[bytes]) -> list[Publication]:
        await self._pass(len(datas))
        return await self.broker.publish_many(channel, datas)


@pytest.fixture
async def gated(make_worker: MakeWorker) -> Gated:
    return Gated((await make_worker()).broker)


@pytest.fixture
async def coalescer(gated: Gated) -> AsyncIterator[Coalescer]:
    coalescer = Coalescer(gated)
    yield coalescer
    await coalescer.close()


def publish_tasks(coalescer: Coalescer, datas: list[bytes]) -> list[asyncio.Task[Publication]]:
    return [asyncio.create_task(coalescer.publish("c", data)) for data in datas]


async def queued(coalescer: Coalescer, n: int, channel: str = "c") -> None:
    await eventually(lambda: coalescer.queued(channel) == n)


def coalescer_tasks() -> set[asyncio.Task[object]]:
    return {t for t in asyncio.all_tasks() if t.get_name().startswith("publish:")}


async def test_a_lone_publish_goes_out_at_once_as_a_plain_publish(
    gated: Gated, coalescer: Coalescer
) -> None:
    first = await coalescer.publish("c", b"1")
    second = await coalescer.publish("c", b"2")
    assert (first.offset, second.offset) == (1, 2)
    assert gated.calls == [1, 1]
    assert coalescer.queued("c") is None
    assert coalescer_tasks() == set()


async def test_publishes_queued_behind_a_call_in_flight_go_in_one_call_each_with_its_own(
    gated: Gated, coalescer: Coalescer
) -> None:
    gated.hold = True
    first = asyncio.create_task(coalescer.publish("c", b"0"))
    await eventually(lambda: gated.gates)
    gated.hold = False
    rest = publish_tasks(coalescer, [b"%d" % n for n in range(1, 11)])
    await queued(coalescer, 10)
    gated.release()
    publications = await asyncio.gather(first, *rest)
    assert gated.calls == [1, 10]
    assert [p.offset for p in publications] == list(range(1, 12))
    assert [p.data for p in publications] == [b"%d" % n for n in range(11)]
    assert len({p.epoch for p in publications}) == 1
    history = await gated.broker.history("c")
    assert [p.data for p in history.publications] == [b"%d" % n for n in range(11)]
    assert coalescer.queued("c") is None
    assert coalescer_tasks() == set()


async def test_requests_keep_their_order_and_a_publish_many_stays_in_one_piece(
    gated: Gated,
) -> None:
    coalescer = Coalescer(gated, max_items=4)
    gated.hold = True
    first = asyncio.create_task(coalescer.publish("c", b"first"))
    await eventually(lambda: gated.gates)
    gated.hold = False
    a = asyncio.create_task(coalescer.publish("c", b"a"))
    many = asyncio.create_task(coalescer.publish_many("c", [b"m%d" % n for n in range(6)]))
    b = asyncio.create_task(coalescer.publish_many("c", [b"b0", b"b1"]))
    c = asyncio.create_task(coalescer.publish("c", b"c"))
    d = asyncio.create_task(coalescer.publish("c", b"d"))
    await queued(coalescer, 5)
    gated.release()
    await asyncio.gather(first, a, many, b, c, d)
    # "a" alone: the next request (6 publications) does not fit beside it; then the 6
    # alone, over the limit but never split; then b, c, d: 4.
    assert gated.calls == [1, 1, 6, 4]
    assert a.result().offset == 2
    assert [p.offset for p in many.result()] == list(range(3, 9))
    assert [p.offset for p in b.result()] == [9, 10]
    assert (c.result().offset, d.result().offset) == (11, 12)
    await coalescer.close()


async def test_a_caller_cancelled_while_queued_is_not_published_and_leaves_no_gap(
    gated: Gated, coalescer: Coalescer
) -> None:
    gated.hold = True
    first = asyncio.create_task(coalescer.publish("c", b"first"))
    await eventually(lambda: gated.gates)
    gated.hold = False
    a, b, c = publish_tasks(coalescer, [b"a", b"b", b"c"])
    await queued(coalescer, 3)
    b.cancel()
    gated.release()
    await asyncio.gather(first, a, c)
    with pytest.raises(asyncio.CancelledError):
        await b
    assert (a.result().offset, c.result().offset) == (2, 3)
    assert gated.calls == [1, 2]
    history = await gated.broker.history("c")
    assert [p.data for p in history.publications] == [b"first", b"a", b"c"]


async def test_a_caller_cancelled_while_its_batch_is_in_flight_does_not_disturb_the_others(
    gated: Gated, coalescer: Coalescer
) -> None:
    """Its publication is in the call already: published once, not reported to it."""
    gated.hold = True
    first = asyncio.create_task(coalescer.publish("c", b"first"))
    await eventually(lambda: len(gated.gates) == 1)
    a, b, c = publish_tasks(coalescer, [b"a", b"b", b"c"])
    await queued(coalescer, 3)
    gated.release(0)
    await first
    await eventually(lambda: len(gated.gates) == 2)  # the batch of a, b, c is in flight
    b.cancel()
    with pytest.raises(asyncio.CancelledError):
        await b
    gated.release(1)
    assert [p.offset for p in await asyncio.gather(a, c)] == [2, 4]
    assert gated.calls == [1, 3]
    history = await gated.broker.history("c")
    assert [p.data for p in history.publications] == [b"first", b"a", b"b", b"c"]
    assert coalescer_tasks() == set()


async def test_the_lone_caller_cancelled_in_flight_still_hands_over_the_queue(
    gated: Gated, coalescer: Coalescer
) -> None:
    gated.hold = True
    first = asyncio.create_task(coalescer.publish("c", b"first"))
    await eventually(lambda: gated.gates)
    gated.hold = False
    a, b = publish_tasks(coalescer, [b"a", b"b"])
    await queued(coalescer, 2)
    first.cancel()  # held at the gate: it never reached the broker
    with pytest.raises(asyncio.CancelledError):
        await first
    assert [p.offset for p in await asyncio.gather(a, b)] == [1, 2]
    assert gated.calls == [1, 2]
    assert coalescer.queued("c") is None


async def test_channels_do_not_wait_for_each_other(gated: Gated, coalescer: Coalescer) -> None:
    gated.hold = True
    held = asyncio.create_task(coalescer.publish("c", b"held"))
    await eventually(lambda: gated.gates)
    gated.hold = False
    other = await coalescer.publish("d", b"free")
    assert other.offset == 1 and coalescer.queued("d") is None
    gated.release()
    assert (await held).offset == 1


async def test_close_fails_the_queued_and_the_in_flight_callers(gated: Gated) -> None:
    coalescer = Coalescer(gated)
    gated.hold = True
    first = asyncio.create_task(coalescer.publish("c", b"first"))
    await eventually(lambda: len(gated.gates) == 1)
    a, b = publish_tasks(coalescer, [b"a", b"b"])
    await queued(coalescer, 2)
    gated.release(0)
    await first
    await eventually(lambda: len(gated.gates) == 2)  # a and b in flight, held
    c = asyncio.create_task(coalescer.publish("c", b"c"))
    await queued(coalescer, 1)
    await coalescer.close()
    for task in (a, b, c):
        with pytest.raises(BrokerUnavailable):
            await task
    assert coalescer.queued("c") is None
    assert coalescer_tasks() == set()
    await coalescer.close()  # idempotent


def test_batches_cut_in_order_within_the_limits() -> None:
    datas = [b"x" * n for n in (1, 2, 3, 4, 5, 6)]
    assert batches(datas, max_items=4, max_bytes=100) == [datas[:4], datas[4:]]
    assert batches(datas, max_items=100, max_bytes=6) == [
        datas[:3],
        [datas[3]],
        [datas[4]],
        [datas[5]],
    ]
    assert batches([b"x" * 10], max_items=1, max_bytes=5) == [[b"x" * 10]]  # alone, whole
    assert batches([]) == []


# -- real faults: Redis stopped under the calls ------------------------------------


async def test_a_failed_call_fails_every_caller_it_carried_and_the_next_call_is_tried(
    own_redis_server: RedisServer, redis_prefix: str
) -> None:
    backend = create_backend(own_redis_server.url, BrokerOptions(key_prefix=redis_prefix))
    gated = Gated(backend.broker)
    coalescer = Coalescer(gated)
    received = Received()
    await backend.broker.start(received.on_message, received.on_resync)
    try:
        assert (await coalescer.publish("c", b"before")).offset == 1
        gated.hold = True
        first = asyncio.create_task(coalescer.publish("c", b"first"))
        await eventually(lambda: len(gated.gates) == 1)
        carried = publish_tasks(coalescer, [b"a", b"b", b"c"])
        await queued(coalescer, 3)
        own_redis_server.stop()
        gated.release(0)  # fails: Redis is gone; then a, b, c go in one call
        with pytest.raises(BrokerUnavailable):
            await first
        await eventually(lambda: len(gated.gates) == 2)
        later = asyncio.create_task(coalescer.publish("c", b"later"))
        await queued(coalescer, 1)
        gated.release(1)
        for task in carried:
            with pytest.raises(BrokerUnavailable):
                await task
        await eventually(lambda: len(gated.gates) == 3)  # "later" is tried, on its own
        own_redis_server.start()  # empty: a new epoch
        gated.release(2)
        assert (await later).offset == 1
        assert gated.calls == [1, 1, 3, 1]
    finally:
        await coalescer.close()
        await backend.broker.close()


# -- the hub, counted by Redis -------------------------------------------------------


@pytest.fixture
async def redis_hub(redis_server: RedisServer, redis_prefix: str) -> AsyncIterator[Hub]:
    backend = create_backend(redis_server.url, BrokerOptions(key_prefix=redis_prefix))
    hub = Hub(backend, presence_enabled=lambda channel: False)
    await hub.start()
    yield hub
    await hub.close()


async def test_fifty_concurrent_hub_publishes_to_one_channel_are_two_script_calls(
    redis_hub: Hub, redis_server: RedisServer
) -> None:
    """The first goes out at once; the other 49 arrive while it is in flight (all 50 tasks
    start in the same loop pass, before any reply can be read) and share the next call."""
    await redis_hub.publish_many("warm", [b"1", b"2"])  # both scripts loaded from here on
    await redis_hub.publish("warm", b"3")
    before = await script_calls(redis_server)
    publications = await asyncio.gather(
        *(redis_hub.publish("c", b'{"n":%d}' % n) for n in range(50))
    )
    assert await script_calls(redis_server) == before + 2
    assert [p.offset for p in publications] == list(range(1, 51))
    assert [p.data for p in publications] == [b'{"n":%d}' % n for n in range(50)]
    assert redis_hub.stats.publications_in == 53
    assert coalescer_tasks() == set()
