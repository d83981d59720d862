"""The ``PresenceStore`` protocol over Redis: a hash of entries and a zset of expiry times
(Redis server clock) per channel; see ``keys``."""

from __future__ import annotations

from redis.typing import EncodableT

from channels.backends.redis.errors import REDIS_ERRORS, unavailable
from channels.backends.redis.keys import Keys
from channels.backends.redis.link import Link
from channels.backends.redis.scripts import Scripts
from channels.broker import BrokerOptions


class RedisPresence:
    def __init__(
        self, connection: Link, keys: Keys, scripts: Scripts, options: BrokerOptions
    ) -> None:
        self._connection = connection
        self._keys = keys
        self._scripts = scripts
        self._ttl_ms = max(1, round(options.presence_ttl * 1000))

    async def add(self, channel: str, client_id: str, entry: bytes) -> bool:
        args: list[EncodableT] = [client_id, entry, self._ttl_ms]
        keys = self._keys.presence(channel)
        try:
            added = await self._connection.run_script(self._scripts.presence_add, keys, args)
        except REDIS_ERRORS as exc:
            raise unavailable("presence add", exc) from exc
        return bool(added)

    async def remove(self, channel: str, client_id: str) -> None:
        keys = self._keys.presence(channel)
        try:
            await self._connection.run_script(self._scripts.presence_remove, keys, [client_id])
        except REDIS_ERRORS as exc:
            raise unavailable("presence remove", exc) from exc

    async def leave(self, channel: str, client_id: str) -> None:
        keys, args = self._keys.presence(channel), [client_id, self._keys.topic(channel)]
        try:
            await self._connection.run_script(self._scripts.presence_leave, keys, args)
        except REDIS_ERRORS as exc:
            raise unavailable("presence leave", exc) from exc

    async def list(self, channel: str) -> list[bytes]:
        keys, args = self._keys.presence(channel), [self._keys.topic(channel)]
        try:
            entries = await self._scripts.presence_list(keys=keys, args=args)
        except REDIS_ERRORS as exc:
            raise unavailable("presence list", exc) from exc
        return list(entries)

    async def expire(self, channel: str) -> None:
        keys, args = self._keys.presence(channel), [self._keys.topic(channel)]
        try:
            await self._scripts.presence_expire(keys=keys, args=args)
        except REDIS_ERRORS as exc:
            raise unavailable("presence expire", exc) from exc
