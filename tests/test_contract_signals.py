"""The ``Signals`` contract, run over every backend (tests/contract.py): a broadcast to
every started worker and a registry of keys, never seen by clients."""

from __future__ import annotations

import asyncio

from tests.conftest import eventually
from tests.contract import MakeWorker

ONE, TWO = b'{"op":"x","n":1}', b'{"op":"x","n":2}'


async def test_a_signal_reaches_every_started_worker_but_no_channel(
    make_worker: MakeWorker, backend_url: str
) -> None:
    here = await make_worker()
    await here.broker.subscribe("c")
    workers = [here]
    if not backend_url.startswith("memory"):  # one process: no other worker to reach
        workers.append(await make_worker())
    await here.signals.signal(ONE)
    await here.signals.signal(TWO)
    for worker in workers:
        await eventually(lambda w=worker: len(w.received.signals) == 2)  # type: ignore[misc]
        assert worker.received.signals == [ONE, TWO]
    assert all(worker.received.messages == [] for worker in workers)


async def test_registry_keys_are_shared_refreshed_and_expire(
    make_worker: MakeWorker, backend_url: str
) -> None:
    a = (await make_worker()).signals
    b = a if backend_url.startswith("memory") else (await make_worker()).signals
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
