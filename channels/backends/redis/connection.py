"""One worker's link to Redis: a bounded pool for commands and one pub/sub reader.

The reader routes each pub/sub message by its topic to the handler subscribed with it,
synchronously and in the order Redis delivers them. What knows about channels, presence
or signals is in the modules that subscribe here; this one knows topics and handlers
only, so that a sharded deployment can hold one ``Connection`` per shard (or send
SSUBSCRIBE) without the broker changing.

Every Redis call is bounded by socket timeouts (``CONNECT_TIMEOUT``, ``COMMAND_TIMEOUT``;
``socket_timeout``/``socket_connect_timeout`` in the URL's query override them), those on
the pub/sub connection by its watch (``_watch``), and none is retried by redis-py, so
nothing hangs or runs twice when Redis is gone."""

from __future__ import annotations

import asyncio
import logging
import random
from asyncio import FIRST_COMPLETED
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from channels.backends.redis.errors import REDIS_ERRORS, unavailable
from channels.backends.redis.pools import (
    COMMAND_TIMEOUT,
    CONNECT_TIMEOUT,
    close,
    command_pool,
    display_name,
)
from channels.backends.redis.pubsub import PubSubLink
from channels.backends.redis.sentinel_watch import master_watch
from channels.broker import BrokerUnavailable
from channels.tasks import Tasks

logger = logging.getLogger(__name__)

TopicHandler = Callable[[bytes], None]  # called with the payload of each message
TopicFilter = Callable[[bytes], bool]
# Called after a reconnect with which topics may have missed messages.
TopicResync = Callable[[TopicFilter], None]


def every_topic(topic: bytes) -> bool:
    return True


class Connection:
    """The command pool (``redis``) and the pub/sub reader of one worker."""

    # Pub/sub reconnects: exponential backoff between these bounds, with jitter.
    reconnect_base = 0.1
    reconnect_cap = 2.0
    # The reader PINGs an idle pub/sub connection; no reply within COMMAND_TIMEOUT after
    # that means it is dead even if the TCP connection looks open (e.g. a network partition).
    ping_interval = 5.0
    # Topics per SUBSCRIBE command when resubscribing.
    subscribe_batch = 1000
    pool_size = 64  # connections for commands, the pub/sub one included

    def __init__(
        self,
        url: str,
        client_name: str,
        *,
        sharded: bool = False,
        on_moved: Callable[[bytes], None] | None = None,
        on_down: Callable[[], None] | None = None,
    ) -> None:
        """``sharded``: topics are Redis Cluster shard channels (SSUBSCRIBE, SPUBLISH) of
        the node at ``url``. ``on_moved`` is called with a topic the node stopped serving
        (its slot moved), ``on_down`` when the pub/sub connection is lost."""
        self.client_name = client_name
        self.name = display_name(url)  # in log lines: which Redis
        self.sharded = sharded
        self._on_moved, self._on_down = on_moved, on_down
        self.redis: Redis = Redis.from_pool(command_pool(url, client_name, self.pool_size))
        self._routes: dict[bytes, TopicHandler] = {}  # subscribed topic -> its handler
        self._waiters: dict[bytes, list[asyncio.Future[None]]] = {}
        self._link: PubSubLink | None = None
        self._opening: set[bytes] = set()  # topics a new link has not had confirmed yet
        self._opened: asyncio.Future[None] | None = None  # ... done when it has
        self._connected = asyncio.Event()
        self._ever_connected = False
        self._on_resync: TopicResync | None = None
        self._tasks = Tasks(logger)
        self._closed = False
        self.reconnects = 0

    @property
    def connected(self) -> bool:
        """The pub/sub connection is up (every topic subscribed)."""
        return self._connected.is_set()

    # -- lifecycle -------------------------------------------------------------------

    async def start(self, on_resync: TopicResync) -> None:
        """Connect the pub/sub reader. If Redis is down the gateway still starts (not
        ready) and the reader keeps trying in the background. ``on_resync`` is called
        after each reconnect: what was published meanwhile was not delivered."""
        self._on_resync = on_resync
        link: PubSubLink | None = None
        try:
            link = await self._open_pubsub()
        except REDIS_ERRORS as exc:
            logger.warning(
                "Redis %s unavailable at start (%s); retrying in the background", self.name, exc
            )
        self._tasks.spawn(self._run(link), "redis-pubsub-reader")
        watch = master_watch(self.redis.connection_pool, lambda: self._link)
        if watch is not None:  # a Sentinel service's master: follow it when it moves
            self._tasks.spawn(watch, "redis-sentinel-watch")

    async def close(self) -> None:
        """Stop the reader and close every connection. Idempotent."""
        if self._closed:
            return
        self._closed = True
        await self._tasks.cancel()
        self._fail_waiters()
        await close(self.redis)
        self._on_resync = None

    async def ready(self) -> bool:
        """Pub/sub connected and a PING answered."""
        if not self._connected.is_set():
            return False
        try:
            return bool(await self.redis.ping())
        except REDIS_ERRORS:
            return False

    # -- topics ----------------------------------------------------------------------

    def route(self, topic: bytes, handler: TopicHandler) -> None:
        """Have ``topic`` subscribed, for ``handler``, from ``start`` on (for topics that
        every worker always listens to); call it before ``start``."""
        self._routes[topic] = handler

    async def subscribe(
        self, topic: bytes, handler: TopicHandler, then: tuple[Any, ...] | None = None
    ) -> Any:
        """Subscribe once per topic; returns when Redis confirmed the SUBSCRIBE.

        ``then``, a command (e.g. a script reading where the topic's channel is), is sent
        right behind the SUBSCRIBE on the pub/sub connection where that speaks RESP3: Redis
        runs it once the subscription is live, so its reply, returned, is the
        confirmation (one round trip, not two). None where it was not sent (RESP2, a
        topic already subscribed) or Redis refused it (e.g. NOSCRIPT): call it apart.

        Waits up to ``CONNECT_TIMEOUT`` for a pub/sub connection being re-established.
        Raises ``BrokerUnavailable`` (and forgets the topic) when it cannot be confirmed.
        """
        if topic in self._routes:
            return None
        self._routes[topic] = handler
        sent_on: PubSubLink | None = None
        try:
            if not self._connected.is_set():
                await asyncio.wait_for(self._connected.wait(), CONNECT_TIMEOUT)
            link = self._link
            if link is None:
                raise RedisConnectionError("pub/sub connection lost")
            link.send(b"SSUBSCRIBE" if self.sharded else b"SUBSCRIBE", topic)
            sent_on = link
            if then is not None and link.resp3:
                try:
                    return await link.call(*then)
                except ResponseError as exc:
                    logger.debug("%r after SUBSCRIBE %r: %s", then[0], topic, exc)
                    return None
            confirmed = asyncio.get_running_loop().create_future()
            self._waiters.setdefault(topic, []).append(confirmed)
            async with asyncio.timeout(COMMAND_TIMEOUT):
                await confirmed
            return None
        except BaseException as exc:
            if self._routes.get(topic) is handler:
                del self._routes[topic]
                if sent_on is not None and sent_on is self._link:
                    # Redis has it (or will): a caller gone (cancelled) or timed out
                    # would leave its messages coming for good.
                    sent_on.send(b"SUNSUBSCRIBE" if self.sharded else b"UNSUBSCRIBE", topic)
            if isinstance(exc, (*REDIS_ERRORS, TimeoutError, BrokerUnavailable)):
                raise unavailable("subscribe", exc) from exc
            raise

    async def unsubscribe(self, topic: bytes) -> None:
        """Forget the topic; never raises (a lost connection resubscribes without it)."""
        if self._routes.pop(topic, None) is None:
            return
        link = self._link
        if link is not None:
            link.send(b"SUNSUBSCRIBE" if self.sharded else b"UNSUBSCRIBE", topic)

    async def publish(self, topic: bytes, payload: bytes) -> None:
        """PUBLISH (SPUBLISH when sharded) ``payload`` to ``topic``."""
        if self.sharded:
            await self.redis.spublish(topic, payload)
        elif (link := self._quick_link()) is not None:
            await link.call(b"PUBLISH", topic, payload)
        else:
            await self.redis.publish(topic, payload)

    async def run_script(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        """``script`` with a small reply (a presence add): on the pub/sub connection where
        it speaks RESP3, with the other calls of its loop turn in one write, no pooled
        connection taken; through the pool otherwise, and where Redis lost the script
        (redis-py's call loads it)."""
        if (link := self._quick_link()) is not None:
            try:
                return await link.call(b"EVALSHA", script.sha, len(keys), *keys, *args)
            except ResponseError as exc:
                if not str(exc).startswith("NOSCRIPT"):
                    raise
        return await script(keys=keys, args=args)

    def _quick_link(self) -> PubSubLink | None:
        link = self._link
        return link if link is not None and link.resp3 and not self.sharded else None

    async def subscriber_count(self, topic: bytes) -> int:
        """How many connections (one per worker) are subscribed to ``topic``."""
        if self.sharded:
            counts = await self.redis.pubsub_shardnumsub(topic)
        else:
            counts = await self.redis.pubsub_numsub(topic)
        return int(counts[0][1]) if counts else 0

    # -- the pub/sub reader ------------------------------------------------------------

    async def _run(self, link: PubSubLink | None) -> None:
        """Read pub/sub until closed, reconnecting (and resyncing) whenever it is lost.

        A connection that fails to open, or dies within ``reconnect_cap`` seconds of
        opening, makes the next attempt wait longer (exponential, with jitter); the first
        reconnect after a connection that lived longer is immediate.
        """
        loop = asyncio.get_running_loop()
        failures = 0
        while True:
            if failures:
                delay = min(self.reconnect_cap, self.reconnect_base * 2 ** (failures - 1))
                await asyncio.sleep(random.uniform(delay / 2, delay))
            if link is None:
                try:
                    link = await self._open_pubsub()
                except REDIS_ERRORS as exc:
                    failures += 1
                    log = logger.warning if failures == 1 else logger.debug
                    log("Redis %s: cannot connect (%s); attempt %d", self.name, exc, failures)
                    continue
            opened = loop.time()
            resync = self._ever_connected
            self._ever_connected = True
            self._link = link
            self._connected.set()
            if resync:
                self.reconnects += 1
                logger.warning(
                    "Redis %s reconnected: resyncing %d topics", self.name, len(self._routes)
                )
                notify_resync(self._on_resync, every_topic)
            try:
                await self._watch(link)
            except REDIS_ERRORS as exc:
                logger.warning("Redis %s: connection lost (%s); reconnecting", self.name, exc)
            except Exception:
                logger.exception("Redis %s: pub/sub reader failed; reconnecting", self.name)
            finally:
                self._connected.clear()
                self._link = None
                self._fail_waiters()
                await link.discard()
                if self._on_down is not None and not self._closed:
                    self._on_down()
            link = None
            failures = failures + 1 if loop.time() - opened < self.reconnect_cap else 0

    async def _open_pubsub(self) -> PubSubLink:
        """A pub/sub connection subscribed to every topic, each SUBSCRIBE confirmed.

        Messages that arrive meanwhile are dispatched as usual (in order).
        """
        link = await PubSubLink.open(self.redis.connection_pool, self._message, self._reply)
        try:
            topics = list(self._routes)
            command = b"SSUBSCRIBE" if self.sharded else b"SUBSCRIBE"
            for batch in self._batches(topics):
                link.send(command, *batch)
            if topics:
                self._opening = set(topics)
                self._opened = opened = asyncio.get_running_loop().create_future()
                try:
                    async with asyncio.timeout(COMMAND_TIMEOUT):
                        await asyncio.wait((opened, link.lost), return_when=FIRST_COMPLETED)
                except TimeoutError:
                    raise RedisTimeoutError("SUBSCRIBE not confirmed in time") from None
                if link.lost.done():
                    raise link.lost.result()
            stale = [topic for topic in topics if topic not in self._routes]
            command = b"SUNSUBSCRIBE" if self.sharded else b"UNSUBSCRIBE"
            for batch in self._batches(stale):  # unsubscribed while we were connecting
                link.send(command, *batch)
        except BaseException:
            await link.discard()
            raise
        finally:
            self._opening, self._opened = set(), None
        return link

    def _batches(self, topics: list[bytes]) -> list[list[bytes]]:
        """Topics for one SUBSCRIBE each: ``subscribe_batch`` at a time, or one slot's
        (SSUBSCRIBE takes the shard channels of one slot only)."""
        if not self.sharded:
            size = self.subscribe_batch
            return [topics[i : i + size] for i in range(0, len(topics), size)]
        slots: dict[int, list[bytes]] = {}
        for topic in topics:
            slots.setdefault(key_slot(topic), []).append(topic)
        return list(slots.values())

    async def _watch(self, link: PubSubLink) -> None:
        """Return never: raise when ``link`` is lost, silent for too long, or stuck (calls
        waiting, none answered for ``COMMAND_TIMEOUT``: replies come in order, so one
        unanswered holds up all later ones; its calls then fail, not a timer each)."""
        loop = asyncio.get_running_loop()
        last_ping = loop.time()
        answered, stuck_since = link.answered, None
        while True:
            await asyncio.wait((link.lost,), timeout=1.0)
            if link.lost.done():
                raise link.lost.result()
            now = loop.time()
            idle = now - link.last_seen
            if idle > self.ping_interval + COMMAND_TIMEOUT:
                raise RedisTimeoutError(f"no reply from Redis for {idle:.1f}s")
            if not link.waiting or link.answered != answered:
                answered, stuck_since = link.answered, None
            elif stuck_since is None:
                stuck_since = now
            elif now - stuck_since >= COMMAND_TIMEOUT:
                raise RedisTimeoutError(f"no call answered for {now - stuck_since:.1f}s")
            if idle >= self.ping_interval and now - last_ping >= self.ping_interval:
                last_ping = now
                link.ping()

    def _message(self, topic: bytes, payload: bytes) -> None:
        handler = self._routes.get(topic)
        if handler is None:
            return  # unsubscribed meanwhile
        try:
            handler(payload)
        except Exception:
            logger.exception("handler of %r failed", topic)

    def _reply(self, reply: Any) -> None:
        """A reply that is not a message: a confirmation, or a PONG (ignored)."""
        if not isinstance(reply, list) or len(reply) < 2:
            return
        kind, topic = reply[0], reply[1]
        if kind == b"subscribe" or kind == b"ssubscribe":
            for waiter in self._waiters.pop(topic, ()):
                if not waiter.done():
                    waiter.set_result(None)
            opening = self._opening
            if opening:
                opening.discard(topic)
                if not opening and self._opened is not None and not self._opened.done():
                    self._opened.set_result(None)
        elif kind == b"sunsubscribe" and self._on_moved and topic in self._routes:
            # Not ours (we forget a topic before unsubscribing): its slot moved away.
            self._on_moved(topic)

    def _fail_waiters(self) -> None:
        waiters, self._waiters = self._waiters, {}
        for futures in waiters.values():
            for waiter in futures:
                if not waiter.done():
                    waiter.set_exception(BrokerUnavailable("Redis pub/sub connection lost"))


def notify_resync(on_resync: TopicResync | None, which: TopicFilter) -> None:
    """Tell ``on_resync`` (if any) that ``which`` topics may have missed messages; a
    handler that fails is logged, never the reader's problem."""
    if on_resync is not None:
        try:
            on_resync(which)
        except Exception:
            logger.exception("resync handler failed")
