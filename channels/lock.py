"""The hub's per-channel locks: a channel's upstream subscribe and unsubscribe never
overlap. Compiled (setup.py).

``Lock`` keeps ``asyncio.Lock``'s rules (CPython 3.11's: waiters woken in order, a
cancelled waiter handing its turn on), in code that is compiled with the hub: taking a
free lock and giving it back are a few native calls, where ``asyncio.Lock``'s
``async with`` runs five Python functions. Every subscribe to a channel the worker
does not relay yet takes one, and so does the last unsubscribe from it: each client of
a per-user channel, at connect and at close.
"""

from __future__ import annotations

import asyncio
import zlib
from collections import deque


class Lock:
    """``asyncio.Lock``, as its 3.11 source has it."""

    def __init__(self) -> None:
        self._locked = False
        self._waiters: deque[asyncio.Future[None]] = deque()

    def locked(self) -> bool:
        return self._locked

    async def acquire(self) -> None:
        """Take the lock: at once when it is free and nobody waits for it (a cancelled
        waiter does not count), else after every waiter before this one."""
        if not self._locked and all(waiter.cancelled() for waiter in self._waiters):
            self._locked = True
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            try:
                await waiter
            finally:
                self._waiters.remove(waiter)
        except asyncio.CancelledError:
            if not self._locked:  # woken, then cancelled: the next one's turn
                self._wake_up_first()
            raise
        self._locked = True

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc_info: object) -> None:
        self.release()

    def release(self) -> None:
        if not self._locked:
            raise RuntimeError("Lock is not acquired.")
        self._locked = False
        self._wake_up_first()

    def _wake_up_first(self) -> None:
        if self._waiters:
            first = self._waiters[0]
            if not first.done():
                first.set_result(None)


class ChannelLocks:
    """A fixed set of locks, a channel's chosen by its name's hash: two channels may
    share one (rarely, and only briefly), one channel always has the same."""

    def __init__(self, size: int = 64) -> None:
        self._locks = [Lock() for _ in range(size)]

    def of(self, channel: str) -> Lock:
        return self._locks[zlib.crc32(channel.encode()) % len(self._locks)]
