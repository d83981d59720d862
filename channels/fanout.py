"""The hub's hot path: what the broker hands over, delivered to this worker's sessions
by the rules in ``channels.hub``.

The broker calls ``_on_message`` synchronously, in each channel's offset order.
Duplicates (an offset at or below the channel's last) are dropped, an epoch change
reaches live sessions as a ``Gap`` first, and an offset gap, or the broker saying it
may have missed messages (``on_resync``), starts a recovery from history: live
messages wait in ``LocalChannel.recovering`` meanwhile and are replayed after it.
Fan-out is once per loop pass for what arrived in that pass (``_flush``): the same
object to every live session, never awaiting one.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from channels.broker import Broker, BrokerUnavailable, ChannelFilter, HistoryPage
from channels.local import LocalChannel
from channels.publication import Batch, Message, Publication, StreamPosition
from channels.session import Gap
from channels.tasks import Tasks

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class HubStats:
    """Plain counters, read by the metrics collector at scrape time (cheap on the hot path)."""

    publications_in: int = 0
    messages_received: int = 0
    deliveries: int = 0
    drops: int = 0
    recoveries: int = 0


class Fanout:
    """The channels of one worker and the delivery of their messages; ``Hub`` adds who
    joins and leaves them."""

    def __init__(self, broker: Broker, recent_size: int = 0) -> None:
        self._broker = broker
        # Publications kept per channel for subscribers resuming from just behind
        # (``LocalChannel.relayed_since``); 0: none.
        self.recent_size = recent_size
        self.stats = HubStats()
        # Publish-to-write latency, sampled once per publication after its fan-out pass
        # (most subscribers are written synchronously inside that pass).
        self.observe_latency: Callable[[float], None] | None = None
        self._channels: dict[str, LocalChannel] = {}
        self._tasks = Tasks(logger)

    @property
    def channel_count(self) -> int:
        return len(self._channels)

    @property
    def subscription_count(self) -> int:
        return sum(len(lc) for lc in self._channels.values())

    def busiest_channels(self, n: int) -> list[tuple[str, int]]:
        """The ``n`` channels with the most subscribers on this worker, with their counts."""
        counts = ((name, len(lc)) for name, lc in self._channels.items())
        return heapq.nlargest(n, counts, key=lambda item: item[1])

    def local_subscribers(self, channel: str) -> int:
        lc = self._channels.get(channel)
        return 0 if lc is None else len(lc)

    # -- delivery (hot path) -----------------------------------------------------

    def _on_message(self, message: Message) -> None:
        lc = self._channels.get(message.channel)
        if lc is None:
            return
        self.stats.messages_received += 1
        if lc.recovering is not None:
            lc.recovering.append(message)
            return
        if isinstance(message, Publication):
            if lc.epoch == message.epoch:
                if message.offset <= lc.offset:
                    self.stats.drops += 1
                    return  # a duplicate, already delivered
                if message.offset > lc.offset + 1:
                    lc.recovering = [message]
                    self._tasks.spawn(self._recover(lc), f"recover:{lc.name}")
                    return
            elif lc.epoch is not None:
                # A new epoch: announce the gap; what the new epoch held before this
                # publication is news to the subscribers too, so recover it first.
                self._push_all(lc, Gap(lc.name, StreamPosition(0, message.epoch)))
                if message.offset > 1:
                    lc.epoch, lc.offset = message.epoch, 0
                    lc.recovering = [message]
                    self._tasks.spawn(self._recover(lc), f"recover:{lc.name}")
                    return
            lc.epoch, lc.offset = message.epoch, message.offset
            lc.remember(message, self.recent_size)
        self._deliver(lc, message)

    def _deliver(self, lc: LocalChannel, message: Message) -> None:
        if lc.live:
            if lc.pending is None:
                lc.pending = [message]
                asyncio.get_running_loop().call_soon(self._flush, lc)
            else:
                lc.pending.append(message)
        if lc.joining:
            for join in lc.joining.values():
                join.buffer.append(message)
        if lc.catching_up:
            self._advance_catching_up(lc, message)

    def _flush(self, lc: LocalChannel) -> None:
        """Write the channel's pending messages to its live sessions: one item per session.

        Called once per loop pass after messages arrived, and before anything that
        changes ``live`` or pushes to a live session directly, so every session sees
        the channel's messages exactly once and in order.
        """
        pending, lc.pending = lc.pending, None
        if not pending:
            return
        item = pending[0] if len(pending) == 1 else Batch(pending)
        live = lc.live
        for session in live:
            session.push(item)
        self.stats.deliveries += len(live) * len(pending)
        first = pending[0]
        if self.observe_latency is not None and live and isinstance(first, Publication):
            self.observe_latency(time.time() - first.published_at)

    def _advance_catching_up(self, lc: LocalChannel, message: Message) -> None:
        if not isinstance(message, Publication):
            for session in lc.catching_up:
                session.push(message)
            return
        for session, last in list(lc.catching_up.items()):
            if message.epoch == last.epoch:
                if message.offset <= last.offset:
                    continue
            else:
                session.push(Gap(lc.name, StreamPosition(message.offset - 1, message.epoch)))
            session.push(message)
            self.stats.deliveries += 1
            del lc.catching_up[session]
            self._flush(lc)  # earlier pending messages are not this session's
            lc.live[session] = None

    def _push_all(self, lc: LocalChannel, item: Gap) -> None:
        """Gap to live sessions; catching-up and joining ones see the epoch change themselves."""
        self._flush(lc)
        for session in lc.live:
            session.push(item)

    def _on_resync(self, which: ChannelFilter) -> None:
        """The broker may have missed messages of ``which`` channels (it reconnected, or
        one shard did): recover them."""
        for lc in self._channels.values():
            if lc.recovering is None and lc.epoch is not None and which(lc.name):
                lc.recovering = []
                self._tasks.spawn(self._recover(lc), f"recover:{lc.name}")

    async def _recover(self, lc: LocalChannel) -> None:
        """Fetch what the live stream skipped, then replay what arrived meanwhile, in order.

        Live messages keep buffering in ``lc.recovering`` until history answers; if
        history no longer covers the hole, subscribers get a ``Gap``. When the stream
        restarted in a new epoch (Redis lost it, or a failover), what the new epoch holds
        follows the gap; otherwise the channel continues from what arrives next.
        """
        self.stats.recoveries += 1
        since = StreamPosition(lc.offset, lc.epoch or "")
        page = await self._read_history(lc.name, since)
        restarted = None
        if not page.complete and page.position.epoch != since.epoch:
            restarted = await self._read_history(lc.name, StreamPosition(0, page.position.epoch))
        pending, lc.recovering = lc.recovering or [], None
        if page.complete:
            for pub in page.publications:
                self._on_message(pub)
        else:
            logger.warning("channel %s: history no longer covers a hole in the stream", lc.name)
            position = gone_on_from(page, restarted, pending)
            self._push_all(lc, Gap(lc.name, position, lost=position.epoch == since.epoch))
            lc.epoch, lc.recent = None, None
            if restarted is not None and restarted.complete:
                lc.epoch, lc.offset = restarted.position.epoch, 0
                for pub in restarted.publications:
                    self._on_message(pub)
        for message in pending:
            self._on_message(message)

    async def _read_history(self, channel: str, since: StreamPosition) -> HistoryPage:
        """History after ``since``, retried (with backoff) while the broker is away."""
        delay = 0.05
        while True:
            try:
                return await self._broker.history(channel, since=since)
            except BrokerUnavailable:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)


def gone_on_from(
    page: HistoryPage, restarted: HistoryPage | None, pending: list[Message]
) -> StreamPosition:
    """Where a channel whose hole history no longer covers goes on from: the start of
    its new epoch when that was read whole, else just before the first publication that
    arrived meanwhile, or the stream's top when none did (what comes next follows it)."""
    if restarted is not None and restarted.complete:
        return StreamPosition(0, restarted.position.epoch)
    top = page.position
    for message in pending:
        if isinstance(message, Publication) and message.epoch == top.epoch:
            if message.offset <= top.offset:
                return StreamPosition(message.offset - 1, top.epoch)
            break
    return top
