"""The local fan-out hub: one broker subscription per channel per worker, the only user
of the worker's ``Backend`` (its broker, presence store and signals).

Delivery rules, for each session and channel:

* every publication after the position a subscribe starts from is delivered
  once, in offset order; recovered history first, then live ones;
* the subscribe result is handed to ``on_ready`` *before* any of the channel's
  publications are queued, so a transport can put its reply (or SSE gap event)
  in front of them; if it raises, the session leaves the channel again (others
  waiting on the channel's join are let go) and the error is the caller's;
* fan-out never awaits a client: the same message object is offered to each
  session's bounded queue (``Session.push``), so whatever a transport builds
  from it is built once (``gateway.wire``).

Joining a live channel without loss or duplicates: the session is parked in
a ``Join`` while the broker subscription and the history read are in flight,
buffering what arrives live; then history, then the buffered messages newer
than the history's top are queued. The live stream may lag behind the history
read (a publication already in history but not yet received over pub/sub): such
a session stays in ``catching_up`` with the last offset it was given and skips
live publications up to it.

When the broker says it may have missed messages (``on_resync``, or an offset
gap seen on a channel), the channel is recovered from history the same way.

The delivery itself (the hot path) is ``channels.fanout``, which ``Hub`` extends with
who joins and leaves; presence is ``channels.presence``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from channels.broker import Backend, BrokerUnavailable, HistoryPage, HistoryQuery, Signals
from channels.coalescer import Coalescer
from channels.errors import SubscribeError as SubscribeError
from channels.errors import check_room
from channels.fanout import Fanout
from channels.local import Join, LocalChannel
from channels.local import SubscribeResult as SubscribeResult
from channels.lock import ChannelLocks
from channels.log_throttle import LogThrottle
from channels.presence import Presence
from channels.publication import Batch, Message, Publication, StreamPosition, compact
from channels.session import Gap, Session

logger = logging.getLogger(__name__)
_NO_BROKER = LogThrottle(logger)  # (a global read on a rare path)


class Hub(Fanout):
    """One worker's channels over a ``Backend``, which only the hub touches."""

    def __init__(
        self,
        backend: Backend,
        *,
        presence_enabled: Callable[[str], bool],
        presence_ttl: float = 30.0,
        max_channels_per_session: int = 128,
        recent_size: int = 0,
    ) -> None:
        super().__init__(backend.broker, recent_size)
        self._signals = backend.signals
        self.max_channels_per_session = max_channels_per_session
        self.sessions: set[Session] = set()
        self._idle: asyncio.Event | None = None  # (``wait_idle``'s, made when it waits)
        self._leaving = 0  # sessions still leaving their channels (a presence leave)
        self._presence = Presence(
            backend.presence,
            backend.broker,
            self._channels,
            enabled=presence_enabled,
            ttl=presence_ttl,
        )
        self._locks = ChannelLocks()
        self._publisher = Coalescer(backend.broker)

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        await self._broker.start(self._on_message, self._on_resync)
        self._tasks.spawn(self._presence.refresh_forever(), "presence-refresh")

    async def close(self) -> None:
        await self._tasks.cancel()
        await self._publisher.close()
        await self._broker.close()

    async def ready(self) -> bool:
        """The broker is reachable (for ``/readyz``)."""
        return await self._broker.ready()

    @property
    def reconnects(self) -> int:
        """How many times the broker reconnected (for metrics)."""
        return self._broker.reconnects

    @property
    def signals(self) -> Signals:
        """Between workers: the LLM relays' cross-worker cancel and registry."""
        return self._signals

    async def has_subscribers(self, channel: str) -> bool:
        """Whether any worker of the cluster is subscribed to ``channel`` right now."""
        return await self._broker.has_subscribers(channel)

    # -- sessions --------------------------------------------------------------

    def register(self, session: Session) -> None:
        self.sessions.add(session)

    async def wait_idle(self) -> None:
        """Return once no session is registered, nor still leaving its channels."""
        while self.sessions or self._leaving:
            if self._idle is None or self._idle.is_set():
                self._idle = asyncio.Event()
            await self._idle.wait()

    def _maybe_idle(self) -> None:
        if not self.sessions and not self._leaving and self._idle is not None:
            self._idle.set()

    def unregister_now(self, session: Session) -> bool:
        """``unregister`` when no channel needs a broker call to be left (each still has
        other subscribers here, none has presence); False, with nothing done, when
        ``unregister`` must be awaited."""
        for channel in session.channels:
            lc = self._channels.get(channel)
            if lc is not None and not self._leaves_now(lc, session):
                return False
        self.sessions.discard(session)
        for channel in list(session.channels):
            self.unsubscribe_now(session, channel)
        self._maybe_idle()
        return True

    async def unregister(self, session: Session) -> None:
        """Leave every channel (presence leave included). Safe to call more than once.
        In a task of its own, which a caller cancelled meanwhile does not stop half way
        (a session kept in the channels not left yet, a Redis subscription nobody reads)."""
        self.sessions.discard(session)
        self._leaving += 1
        await asyncio.shield(self._tasks.spawn(self._unregister(session), "unregister"))

    async def _unregister(self, session: Session) -> None:
        try:
            for channel in list(session.channels):
                try:
                    await self.unsubscribe(session, channel)
                except BrokerUnavailable:  # every client leaving meanwhile: a line a while
                    _NO_BROKER.warning("broker unavailable while %s left %s", session, channel)
        finally:
            self._leaving -= 1
            self._maybe_idle()

    # -- subscribe -------------------------------------------------------------

    def subscribe_now(
        self,
        session: Session,
        channel: str,
        since: StreamPosition | None = None,
        on_ready: Callable[[SubscribeResult], None] | None = None,
    ) -> SubscribeResult | None:
        """``subscribe`` when it needs no broker call: the channel is relayed here, has no
        presence, and ``since`` is none, where the worker is, or a position the
        publications it relayed reach back to (``_join_live``). None, with nothing done,
        when ``subscribe`` must be awaited. Raises as it does."""
        check_room(session.channels, channel, self.max_channels_per_session)
        lc = self._channels.get(channel)
        if lc is None or self._presence.enabled(channel):
            return None
        replay = lc.owed(since)
        return None if replay is None else self._join_live(session, lc, since, on_ready, replay)

    async def subscribe(
        self,
        session: Session,
        channel: str,
        since: StreamPosition | None = None,
        on_ready: Callable[[SubscribeResult], None] | None = None,
    ) -> SubscribeResult:
        joined = self.subscribe_now(session, channel, since, on_ready)
        if joined is not None:
            return joined
        presence = self._presence.enabled(channel)
        lc = self._channels.get(channel)
        if lc is not None and lc.joining and not presence:
            # A reconnect storm: the channel's first subscriber back is reading history;
            # the others wait for it, then join from what it brought (no read each).
            if lc.settled is None:
                lc.settled = asyncio.Event()
            await lc.settled.wait()
            if session.close_reason is not None:
                raise SubscribeError("bad_request", f"closed while subscribing to {channel}")
            joined = self.subscribe_now(session, channel, since, on_ready)
            if joined is not None:
                return joined
            lc = self._channels.get(channel)
        if lc is None:
            lc = self._channels[channel] = LocalChannel(channel)
        join = lc.joining[session] = Join()
        session.channels.add(channel)
        limit = None if since else 0
        replay = None
        try:
            page = None
            if not lc.upstream:  # (the read in the same round trip where the broker can)
                page = await self._ensure_upstream(lc, HistoryQuery(since, limit))
            if presence:
                await self._presence.add(channel, session)
                # A room this worker relays: joined from where it is, as ``subscribe_now``
                # joins, once the entry is in (no read, and no await from here on).
                replay = None if page is not None else lc.owed(since)
            if page is None and replay is None:
                page = await self._broker.history(channel, since=since, limit=limit)
            if lc.joining.pop(session, None) is None:  # unsubscribed meanwhile
                raise SubscribeError("bad_request", f"left {channel} while subscribing")
            if replay is not None:
                result = self._join_live(session, lc, since, on_ready, replay)
                # The joins and leaves that came meanwhile (no offset to be past), one write.
                events: list[Message] = [m for m in join.buffer if not isinstance(m, Publication)]
                if events:
                    session.push(events[0] if len(events) == 1 else Batch(events))
                lc.settle()
                self._announce_join(session, channel)
                return result
            assert page is not None

            # From here to the end of the method there is no await: atomic w.r.t. deliveries.
            recovered = since is not None and page.complete
            result = SubscribeResult(page.position, recovered)
            if on_ready is not None:
                on_ready(result)
            last = since if recovered and since is not None else page.position
            if recovered:
                publications = page.publications
                session.push_replay(publications)
                if publications:
                    last = publications[-1].position
                self.stats.deliveries += len(publications)
                last = page.position if page.position.epoch == last.epoch else last
            for message in join.buffer:
                if isinstance(message, Publication):
                    if message.epoch == last.epoch:
                        if message.offset <= last.offset:
                            continue
                    else:
                        session.push(
                            Gap(channel, StreamPosition(message.offset - 1, message.epoch))
                        )
                    last = message.position
                    self.stats.deliveries += 1
                session.push(message)
            if lc.epoch is None:
                # Nothing has arrived live yet: remember where this subscriber starts, so that
                # a later gap or a broker resync can recover the channel from here.
                lc.epoch, lc.offset = last.epoch, last.offset
            if recovered:
                lc.seed(page.publications, self.recent_size)
            if lc.epoch == last.epoch and lc.offset >= last.offset:
                self._flush(lc)  # pending messages are in what this session was given
                lc.live[session] = None
            else:
                lc.catching_up[session] = last
            lc.settle()
            if presence:
                self._announce_join(session, channel)
            return result
        except BaseException:
            self._drop(session, lc)
            lc.settle()
            if not lc:
                self._tasks.spawn(self._release_upstream(lc), f"unsubscribe:{channel}")
            raise

    def _announce_join(self, session: Session, channel: str) -> None:
        self._tasks.spawn(self._presence.announce(channel, "join", session.presence_entry), "join")

    def _join_live(
        self,
        session: Session,
        lc: LocalChannel,
        since: StreamPosition | None,
        on_ready: Callable[[SubscribeResult], None] | None,
        replay: list[Publication | Batch],
    ) -> SubscribeResult:
        """Join a channel this worker relays, from where it is: no broker call.

        The worker has received every publication of the channel in order up to
        ``lc.position`` (``lc.relaying``), and will relay every later one in order: a session
        that starts there gets each publication after it once, as after a history read.
        The position may be a little behind the cluster's top (publications on their way
        over pub/sub); those reach the session live. A session resuming from behind gets
        ``replay`` first: what the worker relayed after its position, which history
        would have given it.
        """
        result = SubscribeResult(lc.position, since is not None)
        if on_ready is not None:
            on_ready(result)
        session.channels.add(lc.name)
        if replay and since is not None:  # publications since.offset + 1 to lc.offset
            for item in replay:
                session.push(item)
            self.stats.deliveries += lc.offset - since.offset
        self._flush(lc)  # what arrived before is in the position the session starts from
        lc.live[session] = None
        return result

    async def _ensure_upstream(self, lc: LocalChannel, read: HistoryQuery) -> HistoryPage | None:
        async with self._locks.of(lc.name):
            if not lc.upstream and self._channels.get(lc.name) is lc:
                page = await self._broker.subscribe(lc.name, read)
                lc.upstream = True
                return page
        return None

    async def _release_upstream(self, lc: LocalChannel) -> None:
        async with self._locks.of(lc.name):
            if lc.upstream and lc.name not in self._channels:
                lc.upstream = False
                await self._broker.unsubscribe(lc.name)

    def _drop(self, session: Session, lc: LocalChannel) -> bool:
        """Remove ``session`` from ``lc``; forget ``lc`` locally when it is empty."""
        removed = lc.remove(session)
        session.channels.discard(lc.name)
        if not (lc.live or lc.joining or lc.catching_up) and self._channels.get(lc.name) is lc:
            del self._channels[lc.name]
        return removed

    def _leaves_now(self, lc: LocalChannel, session: Session) -> bool:
        """``session`` can leave ``lc`` with no broker call: others stay, no presence."""
        others = len(lc.live) + len(lc.joining) + len(lc.catching_up) > 1  # (no __len__ call)
        return others and not self._presence.enabled(lc.name)

    def unsubscribe_now(self, session: Session, channel: str) -> bool | None:
        """``unsubscribe`` when it needs no broker call (``_leaves_now``); None, with
        nothing done, when ``unsubscribe`` must be awaited."""
        lc = self._channels.get(channel)
        if lc is None or channel not in session.channels:
            session.channels.discard(channel)
            return False
        if not self._leaves_now(lc, session):
            return None
        self._drop(session, lc)
        return True

    async def unsubscribe(self, session: Session, channel: str) -> bool:
        left = self.unsubscribe_now(session, channel)
        if left is not None:
            return left
        lc = self._channels[channel]  # there, with the session in it: else it left now
        self._drop(session, lc)
        try:
            if self._presence.enabled(channel):
                await self._presence.leave(channel, session)
        finally:
            if not lc:
                await self._release_upstream(lc)
        return True

    # -- publish, history, presence ----------------------------------------------

    async def publish(self, channel: str, data: bytes, once: str | None = None) -> Publication:
        """Publishes to one channel that meet share a broker call (``channels.coalescer``);
        one with an idempotency key (``once``) goes alone (``Broker.publish_once``): where
        the channel had it already, the publication that had it, not published again."""
        if once is None:
            publication, new = await self._publisher.publish(channel, compact(data)), True
        else:
            publication, new = await self._broker.publish_once(channel, compact(data), once)
        self.stats.publications_in += new
        return publication

    async def publish_many(self, channel: str, datas: list[bytes]) -> list[Publication]:
        """In one broker call, all or none (``channels.coalescer.batches`` cuts to size)."""
        publications = await self._publisher.publish_many(channel, [compact(d) for d in datas])
        self.stats.publications_in += len(publications)
        return publications

    async def publish_each(self, channels: list[str], data: bytes) -> list[Publication]:
        """``data`` to each of ``channels`` (``/api/broadcast``): a round trip per shard."""
        publications = await self._broker.publish_each(channels, compact(data))
        self.stats.publications_in += len(publications)
        return publications

    async def history(
        self, channel: str, *, since: StreamPosition | None = None, limit: int | None = None
    ) -> HistoryPage:
        return await self._broker.history(channel, since=since, limit=limit)

    async def presence(self, channel: str) -> list[bytes]:
        """The channel's presence entries; ``SubscribeError`` ``not_found`` when the channel
        has no presence."""
        return await self._presence.list(channel)
