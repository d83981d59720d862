"""A log line per kind of event at most so often, for events that come in crowds.

When Redis goes away, every client leaving a channel fails the same way; when the hook
backend is down, every connect does; when a network path stalls, many clients become
slow consumers at once. One line each floods the log at the moment it is read most.
``LogThrottle`` writes the first line of a kind, holds back the lines of the same kind
for ``interval`` seconds, and says how many it held back with the next line it writes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable


class LogThrottle:
    """One ``logger`` line per ``interval`` seconds; the rest counted, not written."""

    __slots__ = ("_clock", "_held", "_last", "interval", "logger")

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.interval = interval
        self._clock = clock
        self._last = -float("inf")
        self._held = 0

    def log(self, level: int, msg: str, *args: object) -> None:
        if not self.logger.isEnabledFor(level):
            return
        now = self._clock()
        if now - self._last < self.interval:
            self._held += 1
            return
        self._last = now
        if self._held:
            msg += " (and %d more like it since the last such line, not logged)"
            args = (*args, self._held)
            self._held = 0
        self.logger.log(level, msg, *args)

    def warning(self, msg: str, *args: object) -> None:
        self.log(logging.WARNING, msg, *args)

    def info(self, msg: str, *args: object) -> None:
        self.log(logging.INFO, msg, *args)


class LogThrottles:
    """A ``LogThrottle`` per key (a hook's name and its kind of line, say), made on first use."""

    __slots__ = ("_by_key", "interval", "logger")

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self.logger = logger
        self.interval = interval
        self._by_key: dict[Hashable, LogThrottle] = {}

    def __getitem__(self, key: Hashable) -> LogThrottle:
        throttle = self._by_key.get(key)
        if throttle is None:
            throttle = self._by_key[key] = LogThrottle(self.logger, self.interval)
        return throttle
