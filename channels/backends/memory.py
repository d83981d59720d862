"""``memory://``: the embedded backend for one process.

Offsets are assigned and fanned out synchronously inside ``publish`` (no await
between the two), so the handler sees each channel's publications in offset
order and a publication is in history before anyone can see it live.

History of a channel is dropped ``history_ttl`` seconds after its last
publication. Its epoch and offset survive while some local client is
subscribed (later publications continue the sequence); a channel nobody
subscribes to is forgotten entirely and starts a new epoch next time.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import deque
from dataclasses import dataclass, field

from channels.broker import (
    Backend,
    BrokerOptions,
    HistoryPage,
    MessageHandler,
    ResyncHandler,
    SignalHandler,
)
from channels.publication import PresenceEvent, Publication, StreamPosition

logger = logging.getLogger(__name__)


def create(url: str, options: BrokerOptions) -> Backend:
    signals = MemorySignals()
    return Backend(MemoryBroker(options, signals), MemoryPresence(), signals)


def new_epoch() -> str:
    return secrets.token_hex(4)


@dataclass(slots=True)
class _Stream:
    epoch: str = field(default_factory=new_epoch)
    offset: int = 0
    last_publish: float = field(default_factory=time.monotonic)
    publications: deque[Publication] = field(default_factory=deque)


class MemoryBroker:
    reconnects = 0  # nothing to reconnect to

    def __init__(self, options: BrokerOptions, signals: MemorySignals) -> None:
        self._options = options
        self._signals = signals
        self._streams: dict[str, _Stream] = {}
        self._subscribed: set[str] = set()
        self._on_message: MessageHandler | None = None
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self, on_message: MessageHandler, on_resync: ResyncHandler) -> None:
        self._on_message = on_message
        self._signals.started = True
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="memory-broker-sweeper")

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        self._on_message = None
        self._signals.started = False

    async def ready(self) -> bool:
        return True

    def _stream(self, channel: str) -> _Stream:
        stream = self._streams.get(channel)
        if stream is None:
            stream = self._streams[channel] = _Stream()
        elif time.monotonic() - stream.last_publish > self._options.history_ttl:
            self._expire(channel, stream)
            stream = self._streams.setdefault(channel, _Stream())
        return stream

    def _expire(self, channel: str, stream: _Stream) -> None:
        if channel in self._subscribed:
            stream.publications.clear()
            stream.last_publish = time.monotonic()
        else:
            del self._streams[channel]

    async def publish(self, channel: str, data: bytes) -> Publication:
        stream = self._stream(channel)
        stream.offset += 1
        stream.last_publish = time.monotonic()
        publication = Publication(channel, stream.offset, stream.epoch, data)
        if self._options.history_size:
            stream.publications.append(publication)
            if len(stream.publications) > self._options.history_size:
                stream.publications.popleft()
        if self._on_message is not None and channel in self._subscribed:
            self._on_message(publication)
        return publication

    async def publish_event(self, channel: str, event: str, client: bytes) -> None:
        if self._on_message is not None and channel in self._subscribed:
            self._on_message(PresenceEvent(channel, event, client))

    async def subscribe(self, channel: str) -> None:
        self._subscribed.add(channel)

    async def unsubscribe(self, channel: str) -> None:
        self._subscribed.discard(channel)

    async def has_subscribers(self, channel: str) -> bool:
        return channel in self._subscribed

    async def history(
        self, channel: str, *, since: StreamPosition | None = None, limit: int | None = None
    ) -> HistoryPage:
        stream = self._stream(channel)
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
        """Free the history of idle channels so memory stays bounded."""
        interval = min(60.0, max(self._options.history_ttl / 2, 0.05))
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for channel, stream in list(self._streams.items()):
                if now - stream.last_publish > self._options.history_ttl:
                    self._expire(channel, stream)
            self._signals.sweep(now)


class MemoryPresence:
    def __init__(self) -> None:
        self._presence: dict[str, dict[str, bytes]] = {}

    async def add(self, channel: str, client_id: str, entry: bytes) -> bool:
        clients = self._presence.setdefault(channel, {})
        added = client_id not in clients
        clients[client_id] = entry
        return added

    async def expire(self, channel: str) -> None:
        """Nothing expires here: one process, whose clients leave when they disconnect."""

    async def remove(self, channel: str, client_id: str) -> None:
        clients = self._presence.get(channel)
        if clients is not None:
            clients.pop(client_id, None)
            if not clients:
                del self._presence[channel]

    async def list(self, channel: str) -> list[bytes]:
        return list(self._presence.get(channel, {}).values())


class MemorySignals:
    def __init__(self) -> None:
        self.started = False  # set by the broker
        self._handlers: list[SignalHandler] = []
        self._registry: dict[str, tuple[bytes, float]] = {}  # key -> (value, expires)

    def listen(self, handler: SignalHandler) -> None:
        self._handlers.append(handler)

    async def signal(self, data: bytes) -> None:
        if self.started:  # later, as from another worker
            asyncio.get_running_loop().call_soon(self._deliver, data)

    def _deliver(self, data: bytes) -> None:
        if not self.started:
            return
        for handler in self._handlers:
            try:
                handler(data)
            except Exception:
                logger.exception("signal handler %r failed", handler)

    async def register(self, key: str, value: bytes, ttl: float) -> None:
        self._registry[key] = (value, time.monotonic() + ttl)

    async def lookup(self, key: str) -> bytes | None:
        entry = self._registry.get(key)
        if entry is None:
            return None
        if entry[1] <= time.monotonic():
            del self._registry[key]
            return None
        return entry[0]

    async def unregister(self, key: str) -> None:
        self._registry.pop(key, None)

    def sweep(self, now: float) -> None:
        for key, (_, expires) in list(self._registry.items()):
            if expires <= now:
                del self._registry[key]
