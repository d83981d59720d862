"""Several backends as one: each channel lives on one shard, chosen by a stable hash.

``GATEWAY_BROKER_URL=redis://a:6379/0,redis://b:6379/0`` (any number of URLs, each of
any shared form: ``redis://``, ``rediss://``, ``redis+sentinel://``). A channel's
offsets, history, presence and fan-out are all on its shard, so the guarantees of one
backend hold per channel, and each publication costs one shard, not all of them:
adding shards adds publish capacity. Each worker holds one connection pool and one
pub/sub connection per shard.

Placement is Lamping and Veach's jump consistent hash of the channel's CRC-32: every
worker and pod computes the same shard from the same list, and a shard appended at the
end takes about 1/N of the channels from each of the others (those start a new epoch
there: their subscribers get a gap once). Keep the order of the list; change it only
with a deploy that replaces every worker.

Signals and the registry (between workers, never seen by clients) use the first shard.
A shard that is down fails only its channels (``BrokerUnavailable``); ``ready`` is
False until every shard answers, and a shard that reconnects has only its own channels
recovered.
"""

from __future__ import annotations

import asyncio
import functools
import zlib
from collections.abc import Callable

from channels.broker import (
    Backend,
    Broker,
    ChannelFilter,
    HistoryPage,
    HistoryQuery,
    MessageHandler,
    PresenceStore,
    ResyncHandler,
)
from channels.publication import Publication, StreamPosition
from channels.tasks import gather_grouped

_JUMP = 2862933555777941757
_MASK = (1 << 64) - 1


def jump_hash(key: int, buckets: int) -> int:
    """The bucket of ``key`` among ``buckets`` (https://arxiv.org/abs/1406.2294)."""
    b, j = -1, 0
    while j < buckets:
        b = j
        key = (key * _JUMP + 1) & _MASK
        j = int((b + 1) * ((1 << 31) / ((key >> 33) + 1)))
    return b


def shard_of(channel: str, shards: int) -> int:
    return jump_hash(zlib.crc32(channel.encode()), shards)


class ShardedBroker:
    def __init__(self, brokers: list[Broker]) -> None:
        self.brokers = brokers
        self.shard = functools.partial(shard_of, shards=len(brokers))

    def _of(self, channel: str) -> Broker:
        return self.brokers[self.shard(channel)]

    async def start(self, on_message: MessageHandler, on_resync: ResyncHandler) -> None:
        await asyncio.gather(
            *(
                broker.start(on_message, self._resync_of(n, on_resync))
                for n, broker in enumerate(self.brokers)
            )
        )

    def _resync_of(self, n: int, on_resync: ResyncHandler) -> ResyncHandler:
        """Shard ``n`` reconnected: only its channels may have missed messages."""

        def resync(which: ChannelFilter) -> None:
            on_resync(lambda channel: self.shard(channel) == n and which(channel))

        return resync

    async def close(self) -> None:
        await asyncio.gather(*(broker.close() for broker in self.brokers))

    async def ready(self) -> bool:
        return all(await asyncio.gather(*(broker.ready() for broker in self.brokers)))

    @property
    def reconnects(self) -> int:
        return sum(broker.reconnects for broker in self.brokers)

    async def publish(self, channel: str, data: bytes) -> Publication:
        return await self._of(channel).publish(channel, data)

    async def publish_many(self, channel: str, datas: list[bytes]) -> list[Publication]:
        return await self._of(channel).publish_many(channel, datas)

    async def publish_once(self, channel: str, data: bytes, key: str) -> tuple[Publication, bool]:
        return await self._of(channel).publish_once(channel, data, key)

    async def publish_each(self, channels: list[str], data: bytes) -> list[Publication]:
        """Each shard's channels in one call to it, the shards at once."""

        async def on_shard(shard: int, names: list[str]) -> list[Publication]:
            return await self.brokers[shard].publish_each(names, data)

        return await gather_grouped(channels, self.shard, on_shard)

    async def publish_event(self, channel: str, event: str, client: bytes) -> None:
        await self._of(channel).publish_event(channel, event, client)

    async def subscribe(self, channel: str, read: HistoryQuery | None = None) -> HistoryPage | None:
        return await self._of(channel).subscribe(channel, read)

    async def unsubscribe(self, channel: str) -> None:
        await self._of(channel).unsubscribe(channel)

    async def has_subscribers(self, channel: str) -> bool:
        return await self._of(channel).has_subscribers(channel)

    async def history(
        self, channel: str, *, since: StreamPosition | None = None, limit: int | None = None
    ) -> HistoryPage:
        return await self._of(channel).history(channel, since=since, limit=limit)


class ShardedPresence:
    def __init__(self, stores: list[PresenceStore], shard: Callable[[str], int]) -> None:
        self.stores = stores
        self.shard = shard

    async def add(self, channel: str, client_id: str, entry: bytes) -> bool:
        return await self.stores[self.shard(channel)].add(channel, client_id, entry)

    async def remove(self, channel: str, client_id: str) -> None:
        await self.stores[self.shard(channel)].remove(channel, client_id)

    async def leave(self, channel: str, client_id: str) -> None:
        await self.stores[self.shard(channel)].leave(channel, client_id)

    async def list(self, channel: str) -> list[bytes]:
        return await self.stores[self.shard(channel)].list(channel)

    async def expire(self, channel: str) -> None:
        await self.stores[self.shard(channel)].expire(channel)


def combine(shards: list[Backend]) -> Backend:
    """One backend over ``shards`` (in the order of the URL list)."""
    broker = ShardedBroker([shard.broker for shard in shards])
    presence = ShardedPresence([shard.presence for shard in shards], broker.shard)
    return Backend(broker, presence, shards[0].signals)
