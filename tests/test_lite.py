"""channels.lite: the idle-cheap Event and Queue behave like asyncio's where used."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import weakref

import pytest

from channels.lite import LiteEvent, LiteQueue, LiteTimers, lite_timers


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


# -- LiteTimers -----------------------------------------------------------------------


async def test_timers_run_in_deadline_order_however_they_were_added() -> None:
    timers = lite_timers()
    ran: list[str] = []
    done = asyncio.Event()
    timers.call_later(0.06, ran.append, "c")
    timers.call_later(0.02, ran.append, "a")  # earlier than the armed one: re-arms
    timers.call_later(0.04, ran.append, "b")
    timers.call_later(0.04, ran.append, "b2")  # same deadline: in the order added
    timers.call_later(0.08, done.set)
    await asyncio.wait_for(done.wait(), 5)
    assert ran == ["a", "b", "b2", "c"]
    assert len(timers) == 0


async def test_a_cancelled_timer_does_not_run_and_lets_go_of_its_callback() -> None:
    class Owner:
        def fire(self) -> None:
            raise AssertionError("a cancelled timer ran")

    owner = Owner()
    ref = weakref.ref(owner)
    timers = lite_timers()
    timer = timers.call_later(0.01, owner.fire)
    timer.cancel()
    timer.cancel()  # idempotent
    assert timer.cancelled()
    del owner
    gc.collect()
    assert ref() is None  # the heap still has the entry, not the owner
    done = asyncio.Event()
    timers.call_later(0.03, done.set)
    await asyncio.wait_for(done.wait(), 5)


async def test_a_failing_callback_does_not_stop_the_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    timers = lite_timers()
    ran: list[int] = []
    done = asyncio.Event()

    def boom() -> None:
        raise RuntimeError("boom")

    timers.call_later(0.01, boom)
    timers.call_later(0.01, ran.append, 1)
    timers.call_later(0.02, done.set)
    await asyncio.wait_for(done.wait(), 5)
    assert ran == [1]
    assert "boom" in caplog.text


async def test_cancelled_timers_are_dropped_from_the_heap_once_they_are_most_of_it() -> None:
    timers = LiteTimers(asyncio.get_running_loop())
    kept = [timers.call_later(3600, lambda: None) for _ in range(100)]
    gone = [timers.call_later(3600, lambda: None) for _ in range(900)]
    for timer in gone:
        timer.cancel()
    assert len(timers) == 100
    assert len(timers._heap) < 1000  # rebuilt without the cancelled ones
    assert all(not t.cancelled() for t in kept)
    for timer in kept:
        timer.cancel()
    assert len(timers) == 0
