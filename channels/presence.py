"""The hub's presence side: local clients' entries in the ``PresenceStore``, their join and
leave announcements (fanned out by the ``Broker``), and the refresh that keeps them alive.

Entries expire in the store unless refreshed, so a worker that dies takes its clients
out of presence within the TTL; another worker's refresh expires them, and the store
announces each ``leave`` once for the cluster.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping

from channels.broker import Broker, BrokerUnavailable, PresenceStore
from channels.errors import SubscribeError
from channels.local import LocalChannel
from channels.session import Session

logger = logging.getLogger(__name__)


class Presence:
    def __init__(
        self,
        store: PresenceStore,
        broker: Broker,
        channels: Mapping[str, LocalChannel],
        *,
        enabled: Callable[[str], bool],
        ttl: float,
    ) -> None:
        self._store = store
        self._broker = broker
        self._channels = channels  # the hub's, read by the refresh
        self.enabled = enabled
        self.ttl = ttl

    async def add(self, channel: str, session: Session) -> None:
        await self._store.add(channel, session.client_id, session.presence_entry)

    async def leave(self, channel: str, session: Session) -> None:
        """Remove the session's entry and announce its ``leave`` (once: ``PresenceStore``)."""
        await self._store.leave(channel, session.client_id)

    async def announce(self, channel: str, event: str, entry: bytes) -> None:
        try:
            await self._broker.publish_event(channel, event, entry)
        except BrokerUnavailable:
            logger.warning("could not announce %s on %s: broker unavailable", event, channel)

    async def list(self, channel: str) -> list[bytes]:
        if not self.enabled(channel):
            raise SubscribeError("not_found", f"presence is not enabled on {channel}")
        return await self._store.list(channel)

    async def refresh_forever(self) -> None:
        """Re-add local clients' presence entries so they outlive the store's TTL, and
        expire other workers' stale ones (a dead worker's clients get their ``leave``).

        An entry that had to be added again (it expired: the broker was unreachable
        for a while, or was flushed) is announced with a ``join`` again.
        """
        store = self._store
        while True:
            await asyncio.sleep(self.ttl / 3)
            for lc in list(self._channels.values()):
                if not self.enabled(lc.name):
                    continue
                try:
                    for session in [*lc.live, *lc.catching_up]:
                        entry = session.presence_entry
                        if not await store.add(lc.name, session.client_id, entry):
                            continue
                        if session in lc.live or session in lc.catching_up:
                            await self.announce(lc.name, "join", entry)
                        else:  # it left while this was in flight: undo the re-add
                            await store.remove(lc.name, session.client_id)
                    await store.expire(lc.name)
                except BrokerUnavailable:
                    # Try again next round: the entries come back once the broker does.
                    logger.debug("presence refresh of %s: broker unavailable", lc.name)
