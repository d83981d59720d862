"""gateway.timers: many long-lived timers on one heap run in order, cancel cleanly, survive
a failing callback, and drop cancelled entries."""

from __future__ import annotations

import asyncio
import gc
import weakref

import pytest

from gateway.timers import PER_PASS, Timers, loop_timers


async def test_timers_run_in_deadline_order_however_they_were_added() -> None:
    timers = loop_timers()
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
    timers = loop_timers()
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
    timers = loop_timers()
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
    timers = Timers(asyncio.get_running_loop())
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


async def test_timers_due_together_run_a_batch_per_loop_pass_in_order() -> None:
    """The heartbeats of streams that connected in the same second fall due together;
    they run ``PER_PASS`` at a time, so what the loop has to do meanwhile (a fan-out
    scheduled with ``call_soon``) runs between two batches, not after all of them."""
    loop = asyncio.get_running_loop()
    timers = Timers(loop)
    ran: list[object] = []
    done = asyncio.Event()

    def first() -> None:
        ran.append(0)
        loop.call_soon(ran.append, "other work")

    timers.call_later(0.01, first)
    for i in range(1, 3 * PER_PASS):
        timers.call_later(0.01, ran.append, i)
    timers.call_later(0.01, done.set)
    await asyncio.wait_for(done.wait(), 5)
    assert ran.index("other work") == PER_PASS
    ran.remove("other work")
    assert ran == list(range(3 * PER_PASS))
    assert len(timers) == 0
