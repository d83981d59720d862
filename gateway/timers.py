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
import itertools
import logging
import math
import weakref
from collections.abc import Callable
from typing import Any

from gateway.timer_entry import ARGS, CALLBACK, WHEN, Timer

logger = logging.getLogger(__name__)

PER_PASS = 64  # timer callbacks run in one pass of the event loop, at most


class Timers:
    """Many long-lived timers of one event loop on one heap and one loop timer.

    A cancelled timer keeps only its place in the heap (no callback, no arguments);
    when cancelled ones are more than half of the heap it is rebuilt without them,
    as asyncio does with its own timers. Use ``loop_timers()`` for the running loop's.
    Each ``Timer`` is a list, its own heap entry, ordered in C (a ``Timer.__lt__`` was a
    Python call for every step of every push and pop; a ``(when, seq, timer)`` tuple
    per timer was one more object for the collector to traverse, for a connection's
    whole life).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._heap: list[Timer] = []
        self._seq = itertools.count()
        self._cancelled = 0
        self._timer: asyncio.Handle | None = None
        self._timer_when = math.inf

    def __len__(self) -> int:
        """Timers still to run."""
        return len(self._heap) - self._cancelled

    def call_later(self, delay: float, callback: Callable[..., object], *args: Any) -> Timer:
        when = self._loop.time() + max(0.0, delay)
        timer = Timer((when, next(self._seq), callback, args, self))
        heapq.heappush(self._heap, timer)
        if when < self._timer_when:
            self._arm(when)
        return timer

    def cancelled(self) -> None:
        self._cancelled += 1
        heap = self._heap
        if self._cancelled > 64 and self._cancelled * 2 > len(heap):
            self._heap = [timer for timer in heap if timer[CALLBACK] is not None]
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
        while heap and heap[0][WHEN] <= now:
            if not budget:  # more are due: the rest in the next pass, after the I/O
                self._timer, self._timer_when = self._loop.call_soon(self._run), now
                return
            timer = heapq.heappop(heap)
            callback, args = timer[CALLBACK], timer[ARGS]
            if callback is None:
                self._cancelled -= 1
                continue
            timer[CALLBACK], timer[ARGS] = None, ()  # ran: a later cancel() is a no-op
            budget -= 1
            try:
                callback(*args)
            except Exception:
                logger.exception("timer callback %r failed", callback)
        if heap:
            self._arm(heap[0][WHEN])


_timers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Timers] = weakref.WeakKeyDictionary()


_last: tuple[weakref.ref[asyncio.AbstractEventLoop], Timers] | None = None  # the last asked


def loop_timers() -> Timers:
    """The running loop's ``Timers``."""
    global _last
    loop = asyncio.get_running_loop()
    last = _last
    if last is not None and last[0]() is loop:  # (no weak key made and dropped per call)
        return last[1]
    timers = _timers.get(loop)
    if timers is None:
        timers = _timers[loop] = Timers(loop)
    _last = (weakref.ref(loop), timers)
    return timers
