"""Keep-alive pings for every WebSocket connection of one event loop, from one timer.

uvicorn runs two timers per connection (the next ping, the pong deadline); an idle
connection then holds two timer handles for its life. Here a loop has one timer that
ticks every quarter of the shorter of the ping interval and timeout and asks each
member whether it is due (``keepalive_check``): a ping every interval, a close when
the pong has not come a timeout after its ping, exactly as the contract says.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Protocol


class Member(Protocol):
    def keepalive_check(self, now: float) -> None:
        """Send a ping if one is due, close if a pong is overdue."""


class Keepalive:
    """Pings every WebSocket connection of one event loop from a single timer."""

    def __init__(self, loop: asyncio.AbstractEventLoop, tick: float) -> None:
        self.loop = loop
        self.tick = tick
        self.members: dict[Member, None] = {}
        self._timer: asyncio.TimerHandle | None = None

    def add(self, member: Member) -> None:
        self.members[member] = None
        if self._timer is None:
            self._timer = self.loop.call_later(self.tick, self._round)

    def discard(self, member: Member) -> None:
        self.members.pop(member, None)

    def _round(self) -> None:
        now = self.loop.time()
        for member in list(self.members):
            member.keepalive_check(now)
        self._timer = self.loop.call_later(self.tick, self._round) if self.members else None


_keepalives: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Keepalive] = (
    weakref.WeakKeyDictionary()
)


def keepalive_for(
    loop: asyncio.AbstractEventLoop, interval: float, timeout: float | None
) -> Keepalive:
    """The loop's ``Keepalive`` (made on first use, with the tick of the first caller)."""
    keepalive = _keepalives.get(loop)
    if keepalive is None:
        tick = max(0.02, min(interval, timeout or interval) / 4)
        keepalive = _keepalives[loop] = Keepalive(loop, tick)
    return keepalive


def loop_keepalive(loop: asyncio.AbstractEventLoop) -> Keepalive | None:
    return _keepalives.get(loop)
