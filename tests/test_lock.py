"""channels.lock: the hub's per-channel locks keep ``asyncio.Lock``'s rules.

Every scenario runs on ``asyncio.Lock`` too: the two must agree on who holds the lock
when, in which order waiters get it, and what a cancelled waiter does to the others.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from channels.lock import ChannelLocks, Lock

KINDS = [pytest.param(Lock, id="channels.lock"), pytest.param(asyncio.Lock, id="asyncio")]


async def _take(lock: Any, name: str, order: list[str], hold: asyncio.Event) -> None:
    async with lock:
        order.append(name)
        await hold.wait()


def _state(kind: type) -> tuple[Any, list[str], asyncio.Event]:
    """A lock of ``kind``, the order its holders took it in, and what they hold it until."""
    return kind(), [], asyncio.Event()


async def _settle() -> None:
    for _ in range(5):  # let woken tasks run their next step
        await asyncio.sleep(0)


@pytest.mark.parametrize("kind", KINDS)
async def test_a_free_lock_is_taken_at_once_and_given_back(kind: type) -> None:
    lock = kind()
    assert not lock.locked()
    await lock.acquire()
    assert lock.locked()
    lock.release()
    assert not lock.locked()
    with pytest.raises(RuntimeError):
        lock.release()


@pytest.mark.parametrize("kind", KINDS)
async def test_waiters_get_the_lock_in_the_order_they_came(kind: type) -> None:
    lock, order, hold = _state(kind)
    tasks = [asyncio.create_task(_take(lock, name, order, hold)) for name in "abcd"]
    await _settle()
    assert order == ["a"] and lock.locked()
    hold.set()
    await asyncio.gather(*tasks)
    assert order == ["a", "b", "c", "d"]
    assert not lock.locked()


@pytest.mark.parametrize("kind", KINDS)
async def test_a_cancelled_waiter_gives_up_its_place(kind: type) -> None:
    lock, order, hold = _state(kind)
    a, b, c = (asyncio.create_task(_take(lock, name, order, hold)) for name in "abc")
    await _settle()
    b.cancel()
    await _settle()
    hold.set()
    await asyncio.gather(a, c)
    assert b.cancelled()
    assert order == ["a", "c"]
    assert not lock.locked()


@pytest.mark.parametrize("kind", KINDS)
async def test_a_waiter_cancelled_after_it_was_woken_hands_its_turn_on(kind: type) -> None:
    lock, order, hold = _state(kind)
    await lock.acquire()
    b, c = (asyncio.create_task(_take(lock, name, order, hold)) for name in "bc")
    await _settle()
    lock.release()  # wakes b ...
    b.cancel()  # ... which is cancelled before it runs: c must not wait forever
    hold.set()
    await asyncio.wait_for(c, 5)
    assert b.cancelled()
    assert order == ["c"]
    assert not lock.locked()


@pytest.mark.parametrize("kind", KINDS)
async def test_a_free_lock_with_only_cancelled_waiters_is_taken_at_once(kind: type) -> None:
    lock, order, hold = _state(kind)
    await lock.acquire()
    waiting = asyncio.create_task(_take(lock, "b", order, hold))
    await _settle()
    waiting.cancel()
    lock.release()
    await asyncio.wait_for(lock.acquire(), 5)  # nobody before it that still waits
    assert lock.locked() and order == []
    lock.release()
    await asyncio.gather(waiting, return_exceptions=True)


def test_a_channel_always_has_the_same_lock() -> None:
    locks = ChannelLocks(size=8)
    assert locks.of("room:1") is locks.of("room:1")
    assert len({id(locks.of(f"room:{n}")) for n in range(100)}) == 8
