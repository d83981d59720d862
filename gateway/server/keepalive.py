"""Keep-alive pings for every WebSocket connection of one event loop, from one timer.

uvicorn runs two timers per connection (the next ping, the pong deadline); an idle
connection then holds two timer handles for its life. Here a loop has one timer and
each connection is asked whether it is due (``keepalive_check``) once per period, a
quarter of the shorter of the ping interval and timeout: a ping every interval, a close
when the pong has not come a timeout after its ping, exactly as the contract says.

The members are spread over the period: they join buckets round-robin, and each tick of
the timer visits one bucket. Clients that all connected in the same second (a deploy, a
crashed pod, a load balancer reload) then get their pings, and send their pongs, a
bucket at a time over the period, not 5,000 in one pass of the loop every interval, a
pause that every publication fanned out behind it would wait for.
"""

from __future__ import annotations

import asyncio
from typing import Final, Protocol

from gateway.timers import PerLoop

SLICE_SECONDS: Final = 0.05  # between two ticks: the period is cut into buckets this long


class Member(Protocol):
    def keepalive_check(self, now: float) -> None:
        """Send a ping if one is due, close if a pong is overdue."""


Bucket = dict[Member, None]


class Keepalive:
    """Pings every WebSocket connection of one event loop from a single timer."""

    def __init__(self, loop: asyncio.AbstractEventLoop, period: float) -> None:
        self.loop = loop
        self.period = period
        self.buckets: list[Bucket] = [{} for _ in range(max(1, round(period / SLICE_SECONDS)))]
        self.tick = period / len(self.buckets)
        self._joins = 0  # round-robin over the buckets
        self._visit = 0  # the bucket the next tick visits
        self._timer: asyncio.TimerHandle | None = None

    @property
    def members(self) -> list[Member]:
        return [member for bucket in self.buckets for member in bucket]

    def add(self, member: Member) -> Bucket:
        """Check ``member`` from now on, until it leaves the bucket returned
        (``bucket.pop(member, None)``)."""
        bucket = self.buckets[self._joins % len(self.buckets)]
        self._joins += 1
        bucket[member] = None
        if self._timer is None:
            self._timer = self.loop.call_later(self.tick, self._tick)
        return bucket

    def _tick(self) -> None:
        bucket = self.buckets[self._visit]
        self._visit = (self._visit + 1) % len(self.buckets)
        if bucket:
            now = self.loop.time()
            for member in list(bucket):
                member.keepalive_check(now)
        more = any(self.buckets)
        self._timer = self.loop.call_later(self.tick, self._tick) if more else None


_keepalives: Final[PerLoop[Keepalive]] = PerLoop()


def keepalive_for(
    loop: asyncio.AbstractEventLoop, interval: float, timeout: float | None
) -> Keepalive:
    """The loop's ``Keepalive`` (made on first use, with the period of the first caller)."""
    keepalive = _keepalives.get(loop)
    if keepalive is None:
        period = max(0.02, min(interval, timeout or interval) / 4)
        keepalive = _keepalives.put(loop, Keepalive(loop, period))
    return keepalive


def loop_keepalive(loop: asyncio.AbstractEventLoop) -> Keepalive | None:
    return _keepalives.get(loop)
