"""Open connections per transport, against ``GATEWAY_MAX_CONNECTIONS``, and how they ended."""

from __future__ import annotations

from collections import Counter

TRANSPORTS = ("websocket", "sse")


class Connections:
    """Plain counters, read by the metrics collector at scrape time."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open: Counter[str] = Counter(dict.fromkeys(TRANSPORTS, 0))
        self.slow_closes: Counter[str] = Counter(dict.fromkeys(TRANSPORTS, 0))
        self.dropped = 0  # deliveries never written: slow consumers' queues, dropped
        self.refused: Counter[tuple[str, str]] = Counter()  # by transport and reason
        self.total = 0  # of ``open``, kept as they change (read by every connect)
        self.at_capacity = limit <= 0

    def opened(self, transport: str) -> None:
        self.open[transport] += 1
        self.total += 1
        self.at_capacity = self.total >= self.limit

    def refuse(self, transport: str, reason: str) -> None:
        """A connection refused before it opened (``gateway.errors.refusal_name``)."""
        self.refused[transport, reason] += 1

    def closed(self, transport: str, *, slow: bool, dropped: int = 0) -> None:
        self.open[transport] -= 1
        self.total -= 1
        self.at_capacity = self.total >= self.limit
        if slow:
            self.slow_closes[transport] += 1
        self.dropped += dropped
