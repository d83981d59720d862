"""Connections that have not sent a whole request head in time: answered 408 and closed.

uvicorn waits for a request head as long as the client takes: a client that connects
and sends nothing, or its request a byte a second (slowloris), holds a connection slot
and a file descriptor for good. The gateway's HTTP protocol registers a connection
here when it opens and when a request's first byte comes after a response, and takes
it out once the request head is complete (an upgrade included); one timer per event
loop, once a second while a connection waits, answers those whose time ran out with
``408 Request Timeout`` (what nginx answers) and closes them.

Every connection waits the same ``timeout`` and is registered when its wait starts, so
the dict holds them in deadline order: a sweep stops at the first that still has time.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

SWEEP_INTERVAL = 1.0  # s: a connection is closed at most this long after its deadline
# Lifespan state: the event loop's ``HeadDeadlines``, which the gateway's HTTP protocol
# registers its connections with (none: no deadline, as under stock uvicorn).
HEAD_DEADLINES = "gateway.head_deadlines"


class Waiting(Protocol):
    def head_timed_out(self) -> None:
        """Its request head did not come in time: answer and close."""


class HeadDeadlines:
    """The connections of one event loop waiting for a request head, and their timer."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self.loop = loop
        self.timeout = timeout
        self._waiting: dict[Waiting, float] = {}
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._waiting)

    def start(self, connection: Waiting) -> None:
        """``connection`` waits for a head from now; one already waiting keeps its time."""
        if connection in self._waiting:
            return
        self._waiting[connection] = self.loop.time() + self.timeout
        if self._timer is None:
            self._timer = self.loop.call_later(SWEEP_INTERVAL, self._sweep)

    def done(self, connection: Waiting) -> None:
        self._waiting.pop(connection, None)

    def _sweep(self) -> None:
        self._timer = None
        waiting, now = self._waiting, self.loop.time()
        late = []
        for connection, deadline in waiting.items():
            if deadline > now:
                break
            late.append(connection)
        for connection in late:
            del waiting[connection]
            connection.head_timed_out()
        if waiting:
            self._timer = self.loop.call_later(SWEEP_INTERVAL, self._sweep)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._waiting.clear()
