"""gateway.server.waiting: the idle-cheap Event and Queue behave like asyncio's where used."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from gateway.server.waiting import LiteEvent, LiteQueue


async def test_event_wakes_every_waiter_and_stays_set_until_cleared() -> None:
    event = LiteEvent()
    assert not event.is_set()
    waiters = [asyncio.create_task(event.wait()) for _ in range(3)]
    await asyncio.sleep(0)
    assert not any(w.done() for w in waiters)
    event.set()
    assert await asyncio.gather(*waiters) == [True, True, True]
    assert event.is_set() and await event.wait() is True  # set: no suspension
    event.clear()
    assert not event.is_set()


async def test_a_cancelled_waiter_does_not_cancel_the_others() -> None:
    event = LiteEvent()
    first = asyncio.create_task(event.wait())
    second = asyncio.create_task(event.wait())
    await asyncio.sleep(0)
    first.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await first
    assert first.cancelled()
    event.set()
    assert await asyncio.wait_for(second, 1) is True
    assert event._waiters is None  # nothing kept once nobody waits


async def test_queue_is_fifo_and_get_waits_for_a_put() -> None:
    queue: LiteQueue[int] = LiteQueue()
    assert queue.empty() and queue.qsize() == 0
    with pytest.raises(asyncio.QueueEmpty):
        queue.get_nowait()
    getter = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    assert not getter.done()
    queue.put_nowait(1)
    queue.put_nowait(2)
    assert await getter == 1
    assert queue.qsize() == 1 and await queue.get() == 2
    assert queue.empty() and queue._items is None


async def test_a_cancelled_get_leaves_the_queue_usable() -> None:
    queue: LiteQueue[str] = LiteQueue()
    getter = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    getter.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await getter
    queue.put_nowait("x")
    assert await asyncio.wait_for(queue.get(), 1) == "x"
