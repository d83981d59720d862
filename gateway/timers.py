"""Many long-lived timers of one event loop on one heap, with one loop timer.

Every connection has timers for its whole life that nearly never fire: its
token's expiry, an SSE stream's heartbeat. A uvloop ``TimerHandle`` each costs
memory per idle connection (figures in docs/benchmarks.md); ``Timers`` keeps one
heap entry per timer and one loop timer for the earliest of them.

Timers that fall due together (the heartbeats of streams that all connected in the
same second) run ``PER_PASS`` at a time, one batch per pass of the loop, so that what
the loop has to deliver meanwhile is not held up behind all of them.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import weakref
from collections.abc import Callable
from typing import Any, Final, Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

PER_PASS: Final = 64  # timer callbacks run in one pass of the event loop, at most


class Timer:
    """One scheduled call of ``Timers``, and its own heap entry, ordered by its deadline
    and then by when it was added (``seq`` is unique: no two compare equal), in
    compiled code. ``cancel()`` drops its references at once."""

    def __init__(
        self,
        when: float,
        seq: int,
        callback: Callable[..., object],
        args: tuple[Any, ...],
        owner: Timers,
    ) -> None:
        self.when = when
        self.seq = seq
        self.callback: Callable[..., object] | None = callback
        self.args = args
        self.owner = owner

    def __lt__(self, other: Timer) -> bool:
        return self.when < other.when or (self.when == other.when and self.seq < other.seq)

    def cancel(self) -> None:
        if self.callback is not None:
            self.callback = None
            self.args = ()
            self.owner.cancelled()

    def cancelled(self) -> bool:
        return self.callback is None


class Timers:
    """Many long-lived timers of one event loop on one heap and one loop timer.

    A cancelled timer keeps only its place in the heap (no callback, no arguments);
    when cancelled ones are more than half of the heap it is rebuilt without them,
    as asyncio does with its own timers. Use ``loop_timers()`` for the running loop's.
    Each ``Timer`` is its own heap entry, compared in compiled code (interpreted, a
    ``Timer.__lt__`` is a Python call for every step of a push and a pop; a ``(when,
    seq, timer)`` tuple per timer was one more object for the collector to traverse,
    for a connection's whole life).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._heap: list[Timer] = []
        self._seq = 0
        self._cancelled = 0
        self._timer: asyncio.Handle | None = None
        self._timer_when = math.inf

    def __len__(self) -> int:
        """Timers still to run."""
        return len(self._heap) - self._cancelled

    def call_later(self, delay: float, callback: Callable[..., object], *args: Any) -> Timer:
        when = self._loop.time() + max(0.0, delay)
        self._seq += 1
        timer = Timer(when, self._seq, callback, args, self)
        heapq.heappush(self._heap, timer)
        if when < self._timer_when:
            self._arm(when)
        return timer

    def cancelled(self) -> None:
        self._cancelled += 1
        heap = self._heap
        if self._cancelled > 64 and self._cancelled * 2 > len(heap):
            self._heap = [timer for timer in heap if timer.callback is not None]
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
        budget = PER_PASS
        while heap and heap[0].when <= now:
            if not budget:  # more are due: the rest in the next pass, after the I/O
                self._timer, self._timer_when = self._loop.call_soon(self._run), now
                return
            timer = heapq.heappop(heap)
            callback, args = timer.callback, timer.args
            if callback is None:
                self._cancelled -= 1
                continue
            timer.callback, timer.args = None, ()  # ran: a later cancel() is a no-op
            budget -= 1
            try:
                callback(*args)
            except Exception:
                logger.exception("timer callback %r failed", callback)
        if heap:
            self._arm(heap[0].when)


class PerLoop(Generic[T]):
    """One object per event loop (its ``Timers``, its ``Keepalive``), held no longer than
    the loop, and the last one asked for kept at hand: no weak key is made and dropped
    per call."""

    def __init__(self) -> None:
        self._of: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, T] = (
            weakref.WeakKeyDictionary()
        )
        self._last_loop: weakref.ref[asyncio.AbstractEventLoop] | None = None
        self._last: T | None = None

    def get(self, loop: asyncio.AbstractEventLoop) -> T | None:
        last_loop = self._last_loop
        if last_loop is not None and last_loop() is loop and self._last is not None:
            return self._last
        found = self._of.get(loop)
        if found is not None:
            self._last_loop, self._last = weakref.ref(loop), found
        return found

    def put(self, loop: asyncio.AbstractEventLoop, value: T) -> T:
        self._of[loop] = value
        self._last_loop, self._last = weakref.ref(loop), value
        return value


_timers: Final[PerLoop[Timers]] = PerLoop()


def loop_timers() -> Timers:
    """The running loop's ``Timers``."""
    loop = asyncio.get_running_loop()
    timers = _timers.get(loop)
    return timers if timers is not None else _timers.put(loop, Timers(loop))
