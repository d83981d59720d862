"""The ``Signals`` contract, run unchanged over every backend (tests/contract.py): a
broadcast to every started worker and a registry of keys, never seen by clients."""

from __future__ import annotations

import asyncio

from tests.conftest import eventually
from tests.contract import MakeWorker, Worker

ONE, TWO = b'{"op":"x","n":1}', b'{"op":"x","n":2}'


async def test_a_signal_reaches_every_started_worker_but_no_channel(
    make_worker: MakeWorker,
) -> None:
    here, there = await make_worker(), await make_worker()
    await here.broker.subscribe("c")
    await there.broker.subscribe("c")
    await here.signals.signal(ONE)
    await here.signals.signal(TWO)
    for worker in (here, there):

        def heard_both(w: Worker = worker) -> bool:
            return len(w.received.signals) == 2

        await eventually(heard_both)
        assert worker.received.signals == [ONE, TWO]
    assert here.received.messages == [] and there.received.messages == []


async def test_listening_before_or_after_the_start_both_hear_every_signal(
    make_worker: MakeWorker,
) -> None:
    before = await make_worker(start=False)  # listens, then starts
    await before.start()
    after = await make_worker(listen=False)  # starts, then listens
    after.listen()
    await after.signals.signal(ONE)
    for worker in (before, after):

        def heard_one(w: Worker = worker) -> bool:
            return w.received.signals == [ONE]

        await eventually(heard_one)


async def test_a_closed_worker_hears_no_more_signals(make_worker: MakeWorker) -> None:
    here, gone = await make_worker(), await make_worker()
    await gone.broker.close()
    await here.signals.signal(ONE)
    await eventually(lambda: here.received.signals == [ONE])
    await here.signals.signal(TWO)  # a marker: what was sent before it has arrived
    await eventually(lambda: here.received.signals == [ONE, TWO])
    assert gone.received.signals == []


async def test_registry_keys_are_shared_refreshed_and_expire(make_worker: MakeWorker) -> None:
    a, b = (await make_worker()).signals, (await make_worker()).signals
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
