"""The ``Signals`` protocol in memory: every started backend of the namespace is a worker."""

from __future__ import annotations

import asyncio
import logging
import time

from channels.backends.memory.namespace import Namespace
from channels.broker import SignalHandler

logger = logging.getLogger(__name__)


class MemorySignals:
    def __init__(self, space: Namespace) -> None:
        self._space = space
        self._handlers: list[SignalHandler] = []

    def listen(self, handler: SignalHandler) -> None:
        self._handlers.append(handler)

    async def signal(self, data: bytes) -> None:
        """Delivered later (``call_soon``), as from another worker, to every started one."""
        loop = asyncio.get_running_loop()
        for deliver in self._space.listeners:
            loop.call_soon(deliver, data)

    def deliver(self, data: bytes) -> None:
        if self.deliver not in self._space.listeners:
            return  # closed meanwhile
        for handler in self._handlers:
            try:
                handler(data)
            except Exception:
                logger.exception("signal handler %r failed", handler)

    async def register(self, key: str, value: bytes, ttl: float) -> None:
        self._space.registry[key] = (value, time.monotonic() + ttl)

    async def lookup(self, key: str) -> bytes | None:
        held = self._space.registry.get(key)
        if held is None:
            return None
        if held[1] <= time.monotonic():
            del self._space.registry[key]
            return None
        return held[0]

    async def unregister(self, key: str) -> None:
        self._space.registry.pop(key, None)
