"""A token bucket: ``rate`` actions per second, bursts up to ``rate`` (at least 1). 0 = off."""

from __future__ import annotations

import time


class RateLimiter:
    __slots__ = ("_allowance", "_last", "burst", "rate")

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.burst = max(rate, 1.0)
        self._allowance = self.burst
        self._last = time.monotonic()

    def allow(self) -> bool:
        if not self.rate:
            return True
        now = time.monotonic()
        self._allowance = min(self.burst, self._allowance + (now - self._last) * self.rate)
        self._last = now
        if self._allowance < 1.0:
            return False
        self._allowance -= 1.0
        return True

    def wait(self) -> float:
        """Seconds until ``allow`` next says yes (0 when it would now)."""
        if not self.rate:
            return 0.0
        since = time.monotonic() - self._last
        return max(0.0, (1.0 - self._allowance) / self.rate - since)
