"""The ``Signals`` protocol over Redis: the ``P:signals`` pub/sub topic, which every
worker's reader subscribes to from the start, and registry keys ``P:r:{K}``."""

from __future__ import annotations

import logging

from channels.backends.redis.errors import REDIS_ERRORS, unavailable
from channels.backends.redis.keys import Keys
from channels.backends.redis.link import Link
from channels.broker import SignalHandler

logger = logging.getLogger(__name__)


class RedisSignals:
    def __init__(self, connection: Link, keys: Keys) -> None:
        self._connection = connection
        self._redis = connection.redis
        self._keys = keys
        self._handlers: list[SignalHandler] = []
        connection.route(keys.signals, self._received)

    def listen(self, handler: SignalHandler) -> None:
        self._handlers.append(handler)

    def _received(self, data: bytes) -> None:
        for handler in self._handlers:
            try:
                handler(bytes(data))
            except Exception:
                logger.exception("signal handler %r failed", handler)

    async def signal(self, data: bytes) -> None:
        try:
            await self._connection.publish(self._keys.signals, data)
        except REDIS_ERRORS as exc:
            raise unavailable("signal", exc) from exc

    async def register(self, key: str, value: bytes, ttl: float) -> None:
        try:
            await self._redis.set(self._keys.registry(key), value, px=max(1, round(ttl * 1000)))
        except REDIS_ERRORS as exc:
            raise unavailable("register", exc) from exc

    async def lookup(self, key: str) -> bytes | None:
        try:
            value = await self._redis.get(self._keys.registry(key))
        except REDIS_ERRORS as exc:
            raise unavailable("lookup", exc) from exc
        return value.encode() if isinstance(value, str) else value

    async def unregister(self, key: str) -> None:
        try:
            await self._redis.delete(self._keys.registry(key))
        except REDIS_ERRORS as exc:
            raise unavailable("unregister", exc) from exc
