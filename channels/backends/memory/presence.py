"""The ``PresenceStore`` protocol in memory, expiring entries as the Redis one does."""

from __future__ import annotations

import time

from channels.backends.memory.namespace import ChannelPresence, Namespace, PresenceEntry
from channels.broker import BrokerOptions
from channels.publication import PresenceEvent


class MemoryPresence:
    def __init__(self, space: Namespace, options: BrokerOptions) -> None:
        self._space = space
        self._ttl = options.presence_ttl

    async def add(self, channel: str, client_id: str, entry: bytes) -> bool:
        """True when the entry was not there; a lapsed entry not removed yet is refreshed
        (False) - nobody announced its leave, so nobody needs a join."""
        now = time.monotonic()
        expires = now + self._ttl
        held = self._space.present(channel, now)
        if held is None:
            held = self._space.presence[channel] = ChannelPresence(expires)
        added = client_id not in held.clients
        held.clients[client_id] = PresenceEntry(entry, expires)
        held.expires = expires
        return added

    async def remove(self, channel: str, client_id: str) -> None:
        held = self._space.present(channel, time.monotonic())
        if held is not None:
            held.clients.pop(client_id, None)
            if not held.clients:
                del self._space.presence[channel]

    async def leave(self, channel: str, client_id: str) -> None:
        held = self._space.present(channel, time.monotonic())
        client = None if held is None else held.clients.pop(client_id, None)
        if held is not None and not held.clients:
            del self._space.presence[channel]
        if client is not None:
            self._space.deliver(channel, PresenceEvent(channel, "leave", client.entry))

    async def list(self, channel: str) -> list[bytes]:
        self._space.reap(channel, time.monotonic())
        held = self._space.presence.get(channel)
        return [] if held is None else [client.entry for client in held.clients.values()]

    async def expire(self, channel: str) -> None:
        self._space.reap(channel, time.monotonic())
