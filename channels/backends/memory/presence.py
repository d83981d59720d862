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
        self._pop(channel, client_id)

    async def leave(self, channel: str, client_id: str) -> None:
        client = self._pop(channel, client_id)
        if client is not None:
            self._space.deliver(channel, PresenceEvent(channel, "leave", client.entry))

    def _pop(self, channel: str, client_id: str) -> PresenceEntry | None:
        """``client_id``'s entry, taken out of ``channel``'s presence (None: not there)."""
        held = self._space.present(channel, time.monotonic())
        if held is None:
            return None
        client = held.clients.pop(client_id, None)
        if not held.clients:
            del self._space.presence[channel]
        return client

    async def list(self, channel: str) -> list[bytes]:
        self._space.reap(channel, time.monotonic())
        held = self._space.presence.get(channel)
        return [] if held is None else [client.entry for client in held.clients.values()]

    async def expire(self, channel: str) -> None:
        self._space.reap(channel, time.monotonic())
