"""The local fan-out hub: one broker subscription per channel per worker.

Delivery rules, for each session and channel:

* every publication after the position a subscribe starts from is delivered
  once, in offset order; recovered history first, then live ones;
* the subscribe result is handed to ``on_ready`` *before* any of the channel's
  publications are queued, so a transport can put its reply (or SSE gap event)
  in front of them;
* fan-out never awaits a client: the message is encoded once and the same
  object is offered to each session's bounded queue (``Session.push``).

Joining a live channel without loss or duplicates: the session is parked in
``_Join`` while the broker subscription and the history read are in flight,
buffering what arrives live; then history, then the buffered messages newer
than the history's top are queued. The live stream may lag behind the history
read (a publication already in history but not yet received over pub/sub): such
a session stays in ``catching_up`` with the last offset it was given and skips
live publications up to it.

When the broker says it may have missed messages (``on_resync``, or an offset
gap seen on a channel), the channel is recovered from history the same way.
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

from channels.broker import Broker, BrokerUnavailable, HistoryPage
from channels.publication import Batch, Message, Publication, StreamPosition, compact
from channels.session import Gap, Session

logger = logging.getLogger(__name__)


class SubscribeError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(slots=True, frozen=True)
class SubscribeResult:
    position: StreamPosition
    recovered: bool


@dataclass(slots=True)
class HubStats:
    """Plain counters, read by the metrics collector at scrape time (cheap on the hot path)."""

    publications_in: int = 0
    messages_received: int = 0
    deliveries: int = 0
    drops: int = 0
    recoveries: int = 0


@dataclass(slots=True)
class _Join:
    buffer: list[Message] = field(default_factory=list)


class LocalChannel:
    __slots__ = (
        "catching_up",
        "epoch",
        "joining",
        "live",
        "name",
        "offset",
        "pending",
        "recovering",
        "upstream",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.live: dict[Session, None] = {}  # insertion-ordered set
        self.joining: dict[Session, _Join] = {}
        self.catching_up: dict[Session, StreamPosition] = {}
        self.epoch: str | None = None
        self.offset = 0
        self.upstream = False
        self.recovering: list[Message] | None = None
        # Messages for ``live`` not written yet: flushed at the end of the loop pass.
        self.pending: list[Message] | None = None

    def __len__(self) -> int:
        return len(self.live) + len(self.joining) + len(self.catching_up)

    def remove(self, session: Session) -> bool:
        if session in self.live:
            del self.live[session]
            return True
        return (
            self.joining.pop(session, None) is not None
            or self.catching_up.pop(session, None) is not None
        )


class Hub:
    def __init__(
        self,
        broker: Broker,
        *,
        presence_enabled: Callable[[str], bool],
        presence_ttl: float = 30.0,
        max_channels_per_session: int = 128,
    ) -> None:
        self.broker = broker
        self.presence_enabled = presence_enabled
        self.presence_ttl = presence_ttl
        self.max_channels_per_session = max_channels_per_session
        self.stats = HubStats()
        # Publish-to-write latency, sampled once per publication after its fan-out pass
        # (most subscribers are written synchronously inside that pass).
        self.observe_latency: Callable[[float], None] | None = None
        self.sessions: set[Session] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._channels: dict[str, LocalChannel] = {}
        self._locks = [asyncio.Lock() for _ in range(64)]
        self._tasks: set[asyncio.Task[None]] = set()
        self._signal_handlers: list[Callable[[bytes], None]] = []

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        await self.broker.start(self._on_message, self._on_resync, self._on_signal)
        self._spawn(self._refresh_presence_forever(), "presence-refresh")

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.broker.close()

    def on_signal(self, handler: Callable[[bytes], None]) -> None:
        """Have ``handler`` called with every signal between workers (``broker.signal``)."""
        self._signal_handlers.append(handler)

    def _on_signal(self, data: bytes) -> None:
        for handler in self._signal_handlers:
            try:
                handler(data)
            except Exception:
                logger.exception("signal handler %r failed", handler)

    def _spawn(self, coro: object, name: str) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("hub task %s crashed", task.get_name(), exc_info=task.exception())

    @property
    def channel_count(self) -> int:
        return len(self._channels)

    @property
    def subscription_count(self) -> int:
        return sum(len(lc) for lc in self._channels.values())

    def local_subscribers(self, channel: str) -> int:
        lc = self._channels.get(channel)
        return 0 if lc is None else len(lc)

    # -- sessions --------------------------------------------------------------

    def register(self, session: Session) -> None:
        self.sessions.add(session)
        self._idle.clear()

    async def wait_idle(self) -> None:
        """Return once no session is registered."""
        await self._idle.wait()

    async def unregister(self, session: Session) -> None:
        """Leave every channel (presence leave included). Safe to call more than once."""
        self.sessions.discard(session)
        try:
            for channel in list(session.channels):
                try:
                    await self.unsubscribe(session, channel)
                except BrokerUnavailable:
                    logger.warning(
                        "broker unavailable while %s left %s", session.client_id, channel
                    )
        finally:
            if not self.sessions:
                self._idle.set()

    # -- subscribe -------------------------------------------------------------

    async def subscribe(
        self,
        session: Session,
        channel: str,
        since: StreamPosition | None = None,
        on_ready: Callable[[SubscribeResult], None] | None = None,
    ) -> SubscribeResult:
        if channel in session.channels:
            raise SubscribeError("bad_request", f"already subscribed to {channel}")
        if len(session.channels) >= self.max_channels_per_session:
            raise SubscribeError("limit_exceeded", "too many channels on one connection")
        lc = self._channels.get(channel)
        if lc is None:
            lc = self._channels[channel] = LocalChannel(channel)
        join = lc.joining[session] = _Join()
        session.channels.add(channel)
        presence = self.presence_enabled(channel)
        try:
            if not lc.upstream:
                await self._ensure_upstream(lc)
            if presence:
                await self.broker.presence_add(channel, session.client_id, session.presence_entry)
            page = await self.broker.history(channel, since=since, limit=None if since else 0)
        except BaseException:
            self._drop(session, lc)
            if not lc:
                self._spawn(self._release_upstream(lc), f"unsubscribe:{channel}")
            raise
        if lc.joining.pop(session, None) is None:  # unsubscribed meanwhile
            raise SubscribeError("bad_request", f"unsubscribed from {channel} while subscribing")

        # From here to the end of the method there is no await: atomic w.r.t. deliveries.
        recovered = since is not None and page.complete
        result = SubscribeResult(page.position, recovered)
        if on_ready is not None:
            on_ready(result)
        last = since if recovered and since is not None else page.position
        if recovered:
            for pub in page.publications:
                session.push(pub)
                last = pub.position
            self.stats.deliveries += len(page.publications)
            last = page.position if page.position.epoch == last.epoch else last
        for message in join.buffer:
            if isinstance(message, Publication):
                if message.epoch == last.epoch:
                    if message.offset <= last.offset:
                        continue
                else:
                    session.push(Gap(channel))
                last = message.position
                self.stats.deliveries += 1
            session.push(message)
        if lc.epoch is None:
            # Nothing has arrived live yet: remember where this subscriber starts, so that
            # a later gap or a broker resync can recover the channel from here.
            lc.epoch, lc.offset = last.epoch, last.offset
        if lc.epoch == last.epoch and lc.offset >= last.offset:
            self._flush(lc)  # pending messages are in what this session was given
            lc.live[session] = None
        else:
            lc.catching_up[session] = last
        if presence:
            self._spawn(self._announce(channel, "join", session.presence_entry), "join")
        return result

    async def _ensure_upstream(self, lc: LocalChannel) -> None:
        async with self._lock(lc.name):
            if not lc.upstream and self._channels.get(lc.name) is lc:
                await self.broker.subscribe(lc.name)
                lc.upstream = True

    async def _release_upstream(self, lc: LocalChannel) -> None:
        async with self._lock(lc.name):
            if lc.upstream and lc.name not in self._channels:
                lc.upstream = False
                await self.broker.unsubscribe(lc.name)

    def _lock(self, channel: str) -> asyncio.Lock:
        return self._locks[zlib.crc32(channel.encode()) % len(self._locks)]

    def _drop(self, session: Session, lc: LocalChannel) -> bool:
        """Remove ``session`` from ``lc``; forget ``lc`` locally when it is empty."""
        removed = lc.remove(session)
        session.channels.discard(lc.name)
        if not lc and self._channels.get(lc.name) is lc:
            del self._channels[lc.name]
        return removed

    async def unsubscribe(self, session: Session, channel: str) -> bool:
        lc = self._channels.get(channel)
        if lc is None or channel not in session.channels:
            session.channels.discard(channel)
            return False
        self._drop(session, lc)
        try:
            if self.presence_enabled(channel):
                await self.broker.presence_remove(channel, session.client_id)
                await self._announce(channel, "leave", session.presence_entry)
        finally:
            if not lc:
                await self._release_upstream(lc)
        return True

    async def _announce(self, channel: str, event: str, entry: bytes) -> None:
        try:
            await self.broker.publish_event(channel, event, entry)
        except BrokerUnavailable:
            logger.warning("could not announce %s on %s: broker unavailable", event, channel)

    # -- publish, history, presence ----------------------------------------------

    async def publish(self, channel: str, data: bytes) -> Publication:
        publication = await self.broker.publish(channel, compact(data))
        self.stats.publications_in += 1
        return publication

    async def history(
        self, channel: str, *, since: StreamPosition | None = None, limit: int | None = None
    ) -> HistoryPage:
        return await self.broker.history(channel, since=since, limit=limit)

    async def presence(self, channel: str) -> list[bytes]:
        if not self.presence_enabled(channel):
            raise SubscribeError("not_found", f"presence is not enabled on {channel}")
        return await self.broker.presence(channel)

    async def _refresh_presence_forever(self) -> None:
        """Re-add local clients' presence entries so they outlive the broker's TTL, and
        expire other workers' stale ones (a dead worker's clients get their ``leave``).

        An entry that had to be added again (it expired: the broker was unreachable
        for a while, or was flushed) is announced with a ``join`` again.
        """
        while True:
            await asyncio.sleep(self.presence_ttl / 3)
            for lc in list(self._channels.values()):
                if not self.presence_enabled(lc.name):
                    continue
                try:
                    for session in [*lc.live, *lc.catching_up]:
                        entry = session.presence_entry
                        if not await self.broker.presence_add(lc.name, session.client_id, entry):
                            continue
                        if session in lc.live or session in lc.catching_up:
                            await self._announce(lc.name, "join", entry)
                        else:  # it left while this was in flight: undo the re-add
                            await self.broker.presence_remove(lc.name, session.client_id)
                    await self.broker.presence_expire(lc.name)
                except BrokerUnavailable:
                    # Try again next round: the entries come back once the broker does.
                    logger.debug("presence refresh of %s: broker unavailable", lc.name)

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
                    self._spawn(self._recover(lc), f"recover:{lc.name}")
                    return
            elif lc.epoch is not None:
                self._push_all(lc, Gap(lc.name))
            lc.epoch, lc.offset = message.epoch, message.offset
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
                session.push(Gap(lc.name))
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

    def _on_resync(self) -> None:
        """The broker may have missed messages (it reconnected): recover every channel."""
        for lc in self._channels.values():
            if lc.recovering is None and lc.epoch is not None:
                lc.recovering = []
                self._spawn(self._recover(lc), f"recover:{lc.name}")

    async def _recover(self, lc: LocalChannel) -> None:
        """Fetch what the live stream skipped, then replay what arrived meanwhile, in order.

        Live messages keep buffering in ``lc.recovering`` until history answers; if
        history no longer covers the hole, subscribers get a ``Gap`` and the channel
        continues from what arrives next.
        """
        self.stats.recoveries += 1
        since = StreamPosition(lc.offset, lc.epoch or "")
        delay = 0.05
        while True:
            try:
                page = await self.broker.history(lc.name, since=since)
                break
            except BrokerUnavailable:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        pending, lc.recovering = lc.recovering or [], None
        if page.complete:
            for pub in page.publications:
                self._on_message(pub)
        else:
            logger.warning("channel %s: history no longer covers a hole in the stream", lc.name)
            self._push_all(lc, Gap(lc.name))
            lc.epoch = None
        for message in pending:
            self._on_message(message)
