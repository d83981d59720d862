"""``asyncio.Event``, ``asyncio.Queue`` and ``loop.call_later`` without their idle cost.

Every connection owns a few of these for its whole life, and nearly always
nobody is waiting on them. ``asyncio.Event`` keeps an empty ``deque`` of
waiters (~760 bytes) and ``asyncio.Queue`` three of them; at tens of thousands
of idle connections that is kilobytes per connection for nothing. These keep
``None`` until someone actually waits or something is queued.

Timers too: a uvloop ``TimerHandle`` that waits for hours (a token's expiry) or
re-arms every few seconds (an SSE heartbeat) costs ~0.8 KiB per connection
(measured: idle connections with and without a token expiry). ``LiteTimers``
keeps one heap entry per timer and one loop timer for the earliest of them.

They implement only what their users call: ``is_set/set/clear/wait``,
``put_nowait/get/get_nowait/empty/qsize`` and ``call_later/cancel``.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


class LiteEvent:
    """An ``asyncio.Event`` whose waiter list exists only while someone waits."""

    __slots__ = ("_flag", "_waiters")

    def __init__(self) -> None:
        self._flag = False
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self._flag

    def set(self) -> None:
        if self._flag:
            return
        self._flag = True
        waiters, self._waiters = self._waiters, None
        if waiters:
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def clear(self) -> None:
        self._flag = False

    async def wait(self) -> bool:
        if self._flag:
            return True
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        try:
            await waiter  # a cancelled waiter cancels only its own future
        finally:
            waiters = self._waiters
            if waiters is not None and waiter in waiters:
                waiters.remove(waiter)
                if not waiters:
                    self._waiters = None
        return True


class LiteQueue(Generic[T]):
    """An unbounded queue for one consumer; no buffers while empty.

    ``on_put``, when set, is called after each ``put_nowait``: a consumer that runs
    no task while the queue is empty starts one from there.
    """

    __slots__ = ("_items", "_waiter", "on_put")

    def __init__(self) -> None:
        self._items: deque[T] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.on_put: Callable[[], object] | None = None

    def put_nowait(self, item: T) -> None:
        if self._items is None:
            self._items = deque()
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self.on_put is not None:
            self.on_put()

    def empty(self) -> bool:
        return not self._items

    def qsize(self) -> int:
        return len(self._items) if self._items else 0

    def get_nowait(self) -> T:
        items = self._items
        if not items:
            raise asyncio.QueueEmpty
        item = items.popleft()
        if not items:
            self._items = None
        return item

    async def get(self) -> T:
        while not self._items:
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        return self.get_nowait()

    def __repr__(self) -> str:
        return f"<LiteQueue size={self.qsize()}>"


class LiteTimer:
    """One scheduled call of ``LiteTimers``; ``cancel()`` drops its references at once."""

    __slots__ = ("args", "callback", "owner", "seq", "when")

    def __init__(
        self,
        owner: LiteTimers,
        when: float,
        seq: int,
        callback: Callable[..., object],
        args: Any,
    ) -> None:
        self.owner = owner
        self.when = when
        self.seq = seq
        self.callback: Callable[..., object] | None = callback
        self.args = args

    def __lt__(self, other: LiteTimer) -> bool:
        return (self.when, self.seq) < (other.when, other.seq)

    def cancel(self) -> None:
        if self.callback is not None:
            self.callback = None
            self.args = ()
            self.owner.cancelled()

    def cancelled(self) -> bool:
        return self.callback is None


class LiteTimers:
    """Many long-lived timers of one event loop on one heap and one loop timer.

    A cancelled timer keeps only its place in the heap (no callback, no arguments);
    when cancelled ones are more than half of the heap it is rebuilt without them,
    as asyncio does with its own timers. Use ``lite_timers()`` for the running loop's.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._heap: list[LiteTimer] = []
        self._seq = itertools.count()
        self._cancelled = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = math.inf

    def __len__(self) -> int:
        """Timers still to run."""
        return len(self._heap) - self._cancelled

    def call_later(self, delay: float, callback: Callable[..., object], *args: Any) -> LiteTimer:
        when = self._loop.time() + max(0.0, delay)
        timer = LiteTimer(self, when, next(self._seq), callback, args)
        heapq.heappush(self._heap, timer)
        if when < self._timer_when:
            self._arm(when)
        return timer

    def cancelled(self) -> None:
        self._cancelled += 1
        heap = self._heap
        if self._cancelled > 64 and self._cancelled * 2 > len(heap):
            self._heap = [t for t in heap if t.callback is not None]
            heapq.heapify(self._heap)
            self._cancelled = 0

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(when, self._run)
        self._timer_when = when

    def _run(self) -> None:
        self._timer, self._timer_when = None, math.inf
        heap, now = self._heap, self._loop.time()
        while heap and heap[0].when <= now:
            timer = heapq.heappop(heap)
            callback, args = timer.callback, timer.args
            if callback is None:
                self._cancelled -= 1
                continue
            timer.callback, timer.args = None, ()  # ran: a later cancel() is a no-op
            try:
                callback(*args)
            except Exception:
                logger.exception("timer callback %r failed", callback)
        if heap:
            self._arm(heap[0].when)


_timers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LiteTimers] = (
    weakref.WeakKeyDictionary()
)


def lite_timers() -> LiteTimers:
    """The running loop's ``LiteTimers``."""
    loop = asyncio.get_running_loop()
    timers = _timers.get(loop)
    if timers is None:
        timers = _timers[loop] = LiteTimers(loop)
    return timers
