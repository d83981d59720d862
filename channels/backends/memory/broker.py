"""The ``Broker`` protocol in memory: see the package docstring for its guarantees."""

from __future__ import annotations

import asyncio
import logging
import time

from channels.backends.memory.namespace import Namespace
from channels.backends.memory.signals import MemorySignals
from channels.broker import BrokerOptions, HistoryPage, HistoryQuery, MessageHandler, ResyncHandler
from channels.publication import Message, PresenceEvent, Publication, StreamPosition

logger = logging.getLogger(__name__)


class MemoryBroker:
    reconnects = 0  # nothing to reconnect to

    def __init__(self, space: Namespace, options: BrokerOptions, signals: MemorySignals) -> None:
        self._space = space
        self._options = options
        self._signals = signals
        self._on_message: MessageHandler | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._closed = False
        space.backends += 1

    async def start(self, on_message: MessageHandler, on_resync: ResyncHandler) -> None:
        self._on_message = on_message
        self._space.listeners[self._signals.deliver] = None
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="memory-broker-sweeper")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        space = self._space
        space.listeners.pop(self._signals.deliver, None)
        for channel in [c for c, brokers in space.subscribers.items() if self.receive in brokers]:
            self._leave(channel)
        self._on_message = None
        space.release()

    async def ready(self) -> bool:
        return True

    def receive(self, message: Message) -> None:
        """A message of a subscribed channel, from this namespace's fan-out."""
        if self._on_message is not None:
            try:
                self._on_message(message)
            except Exception:
                logger.exception("message handler failed on %s", message.channel)

    async def publish(self, channel: str, data: bytes) -> Publication:
        return self._publish(channel, data)

    async def publish_many(self, channel: str, datas: list[bytes]) -> list[Publication]:
        """Nothing runs in between: one synchronous step, as for ``publish``."""
        return [self._publish(channel, data) for data in datas]

    async def publish_each(self, channels: list[str], data: bytes) -> list[Publication]:
        return [self._publish(channel, data) for channel in channels]

    async def publish_once(self, channel: str, data: bytes, key: str) -> tuple[Publication, bool]:
        """The key in the namespace's registry (``once:{<channel>}:<key>``: a channel name
        has no braces, so that ``a`` with ``b:c`` is not ``a:b`` with ``c``), as Redis keeps it."""
        registry, now = self._space.registry, time.monotonic()
        name = f"once:{{{channel}}}:{key}"
        seen = registry.get(name)
        if seen is not None and seen[1] > now:
            offset, epoch = seen[0].split(b" ")
            return Publication(channel, int(offset), epoch.decode(), data), False
        publication = self._publish(channel, data)
        value = f"{publication.offset} {publication.epoch}".encode()
        registry[name] = (value, now + self._options.idempotency_ttl)
        return publication, True

    def _publish(self, channel: str, data: bytes) -> Publication:
        options, space = self._options, self._space
        now = time.monotonic()
        stream = space.streams.get(channel)
        if stream is None or stream.expires <= now:
            stream = space.stream(channel, options.history_ttl)
        stream.offset += 1
        stream.expires = now + options.history_ttl
        publication = Publication(channel, stream.offset, stream.epoch, data)
        if options.history_size:
            stream.publications.append(publication)
            while len(stream.publications) > options.history_size:
                stream.publications.popleft()
        receivers = space.subscribers.get(channel)  # space.deliver, inlined: the hot path
        if receivers:
            for receive in receivers:
                receive(publication)
        return publication

    async def publish_event(self, channel: str, event: str, client: bytes) -> None:
        self._space.deliver(channel, PresenceEvent(channel, event, client))

    async def subscribe(self, channel: str, read: HistoryQuery | None = None) -> None:
        self._space.subscribers.setdefault(channel, {})[self.receive] = None

    async def unsubscribe(self, channel: str) -> None:
        self._leave(channel)

    def _leave(self, channel: str) -> None:
        brokers = self._space.subscribers.get(channel)
        if brokers is not None:
            brokers.pop(self.receive, None)
            if not brokers:
                del self._space.subscribers[channel]

    async def has_subscribers(self, channel: str) -> bool:
        return channel in self._space.subscribers

    async def history(
        self, channel: str, *, since: StreamPosition | None = None, limit: int | None = None
    ) -> HistoryPage:
        stream = self._space.stream(channel, self._options.history_ttl)
        kept = stream.publications
        position = StreamPosition(stream.offset, stream.epoch)
        if since is None:
            items = (
                list(kept) if limit is None else list(kept)[len(kept) - limit :] if limit else []
            )
            return HistoryPage(items, position)
        first_kept = kept[0].offset if kept else stream.offset + 1
        complete = (
            since.epoch == stream.epoch
            and since.offset <= stream.offset
            and since.offset >= first_kept - 1
        )
        if not complete:
            return HistoryPage([], position, complete=False)
        start = since.offset - first_kept + 1  # index of the first publication after `since`
        end = len(kept) if limit is None else min(len(kept), start + limit)
        return HistoryPage([kept[i] for i in range(start, end)], position)

    async def _sweep_forever(self) -> None:
        """Free the namespace's lapsed history, presence and keys so memory stays bounded."""
        interval = min(60.0, max(self._options.history_ttl / 2, 0.05))
        while True:
            await asyncio.sleep(interval)
            self._space.sweep(self._options.history_ttl)
