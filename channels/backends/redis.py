"""``redis://``: the broker shared by every worker and pod, over one Redis (redis.asyncio, hiredis).

Keys of channel ``C`` under the prefix ``P`` (``BrokerOptions.key_prefix``). The channel is
wrapped in a hash tag: names cannot contain braces, so ``P:h:{a:b}`` and ``P:h:{a}`` never
collide, and all keys of one channel share a Redis Cluster slot (the scripts need that):

* ``P:m:{C}`` hash ``epoch``, ``offset``: the stream's top. Expires ``history_meta_ttl``
  after the last publication - longer than the history on purpose: offsets keep counting
  after the history expired, and a client whose position is the top still recovers.
* ``P:h:{C}`` stream, the last ``history_size`` publications (exact ``MAXLEN``); the entry
  id is ``0-<offset>``, so "everything after N" is ``XRANGE 0-(N+1) +`` (O(log n + k)).
  Fields ``d`` (data) and ``t`` (the publisher's clock). Expires ``history_ttl`` after the
  last publication.
* ``P:p:{C}`` hash client id -> presence entry, ``P:z:{C}`` sorted set client id -> expiry
  (Redis server clock, ms). Both keys expire ``presence_ttl`` after the last refresh.
  An entry whose expiry passed (its worker died) is removed by the next presence read
  or ``presence_expire``, which publishes its ``leave`` in the same script.
* pub/sub topic ``P:t:{C}``: ``p<offset> <epoch> <time> <data>`` for a publication,
  ``e<event> <client>`` for a join or leave.
* Between workers: pub/sub topic ``P:signals`` (every worker's reader is subscribed to it
  from the start, whatever its channels), and registry keys ``P:r:{K}`` (plain strings
  with an expiry).

Delivery guarantees:

* Offsets: one Lua script reads (or creates, with a new random epoch) the meta, increments
  the offset, appends to the stream and PUBLISHes, atomically on the server. Every worker
  agrees on offsets, there are no gaps or duplicates, and a publication is in history
  before anyone can see it live.
* Order: Redis runs scripts one at a time and delivers one connection's pub/sub messages in
  publish order; one reader task hands them to ``on_message`` synchronously, so each
  channel's publications arrive in offset order.
* Pub/sub itself is at-most-once: what is published while this worker's pub/sub connection
  is down is not delivered. The reader then reconnects (exponential backoff with jitter),
  resubscribes every channel, waits for Redis to confirm, and only then calls
  ``on_resync``: the hub recovers every channel from history, so nothing published
  while cut off is lost as long as it is still in history.
* ``publish`` raising ``BrokerUnavailable`` after a refused connection means nothing was
  published. After a *timeout* it is ambiguous (the script may have run) - as for any
  remote call; the caller cannot tell and a retry may publish twice.
* Redis flushed or restarted empty: the meta is gone, the next read or publish creates a
  new epoch. The hub's recovery then finds the old position incomplete and sends a gap.

A subscribe returns only once Redis confirmed the SUBSCRIBE, so that a history read made
after it cannot miss a publication that the subscription did not see either.

Every Redis call is bounded by socket timeouts (``CONNECT_TIMEOUT``, ``COMMAND_TIMEOUT``;
``socket_timeout``/``socket_connect_timeout`` in the URL's query override them) and is
never retried by redis-py, so nothing hangs or runs twice when Redis is gone.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
from collections.abc import Coroutine
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.maint_notifications import MaintNotificationsConfig
from redis.typing import EncodableT

from channels.broker import (
    BrokerOptions,
    BrokerUnavailable,
    HistoryPage,
    MessageHandler,
    ResyncHandler,
    SignalHandler,
)
from channels.publication import Message, PresenceEvent, Publication, StreamPosition

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT = 2.0
SIGNALS = "$signals"  # the signal topic's place in the topic -> channel map
COMMAND_TIMEOUT = 5.0

# KEYS: meta, stream. ARGV: new epoch, data, time, history size, history ttl ms, meta ttl ms,
# topic. Returns {offset, epoch}.
PUBLISH_LUA = """
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch)
end
local offset = redis.call('HINCRBY', KEYS[1], 'offset', 1)
redis.call('PEXPIRE', KEYS[1], ARGV[6])
local size = tonumber(ARGV[4])
if size > 0 then
  redis.call('XADD', KEYS[2], 'MAXLEN', size, string.format('0-%d', offset),
             'd', ARGV[2], 't', ARGV[3])
  redis.call('PEXPIRE', KEYS[2], ARGV[5])
end
redis.call('PUBLISH', ARGV[7],
           string.format('p%d ', offset) .. epoch .. ' ' .. ARGV[3] .. ' ' .. ARGV[2])
return {offset, epoch}
"""

# KEYS: meta, stream. ARGV: new epoch, meta ttl ms, since offset (-1: none), since epoch,
# limit (-1: none). Returns {epoch, top offset, status, entries}; status 0: incomplete,
# 1: entries oldest first, 2: entries newest first. A missing meta is created (offset 0,
# new epoch) so that an unknown channel has an epoch that the next publish keeps.
HISTORY_LUA = """
local state = redis.call('HMGET', KEYS[1], 'epoch', 'offset')
local epoch, top = state[1], tonumber(state[2])
if not epoch then
  epoch, top = ARGV[1], 0
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'offset', 0)
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
local since, limit = tonumber(ARGV[3]), tonumber(ARGV[5])
if since < 0 then
  if limit == 0 then return {epoch, top, 1, {}} end
  if limit < 0 then return {epoch, top, 1, redis.call('XRANGE', KEYS[2], '-', '+')} end
  return {epoch, top, 2, redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', limit)}
end
if ARGV[4] ~= epoch or since > top then return {epoch, top, 0, {}} end
local first = top + 1
local head = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
if #head > 0 then first = tonumber(string.match(head[1][1], '%d+$')) end
if since < first - 1 then return {epoch, top, 0, {}} end
if since == top or limit == 0 then return {epoch, top, 1, {}} end
local start = string.format('0-%d', since + 1)
if limit < 0 then return {epoch, top, 1, redis.call('XRANGE', KEYS[2], start, '+')} end
return {epoch, top, 1, redis.call('XRANGE', KEYS[2], start, '+', 'COUNT', limit)}
"""

_NOW_MS = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
"""

# KEYS: entries hash, expiry zset. ARGV: client id, entry, ttl ms.
# Returns 1 when the entry was not there (new, or expired and reaped meanwhile).
PRESENCE_ADD_LUA = (
    _NOW_MS
    + """
local added = redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return added
"""
)

# KEYS: entries hash, expiry zset. ARGV: the channel's pub/sub topic. Drops the entries
# whose expiry passed and publishes a leave for each: removal and leave in one script,
# so whichever worker gets there first announces a client's leave, and only once.
_REAP = (
    _NOW_MS
    + """
local stale = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
for i = 1, #stale do
    local entry = redis.call('HGET', KEYS[1], stale[i])
    if entry then
        redis.call('HDEL', KEYS[1], stale[i])
        redis.call('PUBLISH', ARGV[1], 'eleave ' .. entry)
    end
end
if #stale > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now) end
"""
)
PRESENCE_EXPIRE_LUA = _REAP + "return #stale\n"
PRESENCE_LUA = _REAP + "return redis.call('HVALS', KEYS[1])\n"  # the live entries


def new_epoch() -> str:
    return secrets.token_hex(4)


class RedisBroker:
    """The ``Broker`` protocol over Redis: see the module docstring for keys and guarantees.

    One pub/sub connection per broker (per worker) with one SUBSCRIBE per channel that has
    local subscribers; commands go through a pool of ordinary connections.
    """

    # Pub/sub reconnects: exponential backoff between these bounds, with jitter.
    reconnect_base = 0.1
    reconnect_cap = 2.0
    # The reader PINGs an idle pub/sub connection; no reply within COMMAND_TIMEOUT after
    # that means it is dead even if the TCP connection looks open (e.g. a network partition).
    ping_interval = 5.0
    # Channels per SUBSCRIBE command when resubscribing.
    subscribe_batch = 1000
    pool_size = 64  # connections for commands, the pub/sub one included

    def __init__(self, url: str, options: BrokerOptions | None = None) -> None:
        self._options = options or BrokerOptions()
        prefix = self._options.key_prefix
        if "{" in prefix or "}" in prefix:
            raise ValueError("the Redis key prefix cannot contain '{' or '}'")
        self._prefix = prefix
        # A bounded pool: a burst of subscribes (thousands of clients reconnecting at
        # once) waits for a free connection instead of opening one socket per command
        # under a 2 s connect timeout - which refused 1-2 % of them on a busy machine.
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=self.pool_size,
            timeout=COMMAND_TIMEOUT,
            socket_timeout=COMMAND_TIMEOUT,
            socket_connect_timeout=CONNECT_TIMEOUT,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
            decode_responses=False,
            client_name=f"gateway:{'_'.join(prefix.split())}",  # for CLIENT LIST
            # With maintenance notifications on ("auto", the default under RESP3), redis-py
            # 8.1 skips its check-out probe and hands out pooled connections the server
            # closed (after a Redis restart the first command fails): redis/redis-py#4252.
            maint_notifications_config=MaintNotificationsConfig(enabled=False),
        )
        self._redis: Redis = Redis.from_pool(pool)
        self._publish_script = self._redis.register_script(PUBLISH_LUA)
        self._history_script = self._redis.register_script(HISTORY_LUA)
        self._presence_add_script = self._redis.register_script(PRESENCE_ADD_LUA)
        self._presence_script = self._redis.register_script(PRESENCE_LUA)
        self._presence_expire_script = self._redis.register_script(PRESENCE_EXPIRE_LUA)
        self._history_ttl_ms = max(1, round(self._options.history_ttl * 1000))
        meta_ttl = max(self._options.history_meta_ttl, self._options.history_ttl)
        self._meta_ttl_ms = max(1, round(meta_ttl * 1000))
        self._presence_ttl_ms = max(1, round(self._options.presence_ttl * 1000))

        self._channels: dict[str, bytes] = {}  # subscribed channel -> topic
        self._topics: dict[bytes, str] = {}  # topic -> channel
        self._waiters: dict[bytes, list[asyncio.Future[None]]] = {}
        self._pubsub: PubSub | None = None
        self._connected = asyncio.Event()
        self._ever_connected = False
        self._on_message: MessageHandler | None = None
        self._on_resync: ResyncHandler | None = None
        self._on_signal: SignalHandler | None = None
        self._signals = f"{prefix}:signals".encode()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self.reconnects = 0  # read by the gateway's metrics

    # -- keys ------------------------------------------------------------------------

    def _key(self, kind: str, channel: str) -> str:
        return f"{self._prefix}:{kind}:{{{channel}}}"

    def _topic(self, channel: str) -> bytes:
        return self._key("t", channel).encode()

    # -- lifecycle -------------------------------------------------------------------

    async def start(
        self,
        on_message: MessageHandler,
        on_resync: ResyncHandler,
        on_signal: SignalHandler | None = None,
    ) -> None:
        """Connect the pub/sub reader. If Redis is down the gateway still starts (not
        ready) and the reader keeps trying in the background."""
        self._on_message = on_message
        self._on_resync = on_resync
        self._on_signal = on_signal
        # Subscribed like a channel (and resubscribed after a reconnect); "$" keeps its
        # name out of the channels' namespace.
        self._topics[self._signals] = SIGNALS
        pubsub: PubSub | None = None
        try:
            pubsub = await self._open_pubsub()
        except (RedisError, OSError) as exc:
            logger.warning("Redis unavailable at start (%s); retrying in the background", exc)
        self._spawn(self._run(pubsub), "redis-pubsub-reader")

    async def close(self) -> None:
        """Stop the reader and close every connection. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._fail_waiters()
        await self._redis.aclose()
        self._on_message = self._on_resync = self._on_signal = None

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("task %s crashed", task.get_name(), exc_info=task.exception())

    async def ready(self) -> bool:
        """Pub/sub connected and a PING answered."""
        if not self._connected.is_set():
            return False
        try:
            return bool(await self._redis.ping())
        except (RedisError, OSError):
            return False

    # -- publish, history, presence --------------------------------------------------------

    async def publish(self, channel: str, data: bytes) -> Publication:
        stamp = f"{time.time():.6f}"
        args: list[EncodableT] = [
            new_epoch(),
            data,
            stamp,
            self._options.history_size,
            self._history_ttl_ms,
            self._meta_ttl_ms,
            self._topic(channel),
        ]
        keys = [self._key("m", channel), self._key("h", channel)]
        try:
            offset, epoch = await self._publish_script(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            raise _unavailable("publish", exc) from exc
        return Publication(channel, int(offset), epoch.decode(), data, published_at=float(stamp))

    async def publish_event(self, channel: str, event: str, client: bytes) -> None:
        try:
            await self._redis.publish(self._topic(channel), b"e" + event.encode() + b" " + client)
        except (RedisError, OSError) as exc:
            raise _unavailable("publish_event", exc) from exc

    async def history(
        self, channel: str, *, since: StreamPosition | None = None, limit: int | None = None
    ) -> HistoryPage:
        args: list[EncodableT] = [
            new_epoch(),
            self._meta_ttl_ms,
            -1 if since is None else since.offset,
            "" if since is None else since.epoch,
            -1 if limit is None else limit,
        ]
        keys = [self._key("m", channel), self._key("h", channel)]
        try:
            raw_epoch, top, status, entries = await self._history_script(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            raise _unavailable("history", exc) from exc
        epoch = raw_epoch.decode()
        position = StreamPosition(int(top), epoch)
        if status == 0:
            return HistoryPage([], position, complete=False)
        publications = [_entry(channel, epoch, entry) for entry in entries]
        if status == 2:
            publications.reverse()
        return HistoryPage(publications, position)

    async def presence_add(self, channel: str, client_id: str, entry: bytes) -> bool:
        keys = [self._key("p", channel), self._key("z", channel)]
        try:
            added = await self._presence_add_script(
                keys=keys, args=[client_id, entry, self._presence_ttl_ms]
            )
        except (RedisError, OSError) as exc:
            raise _unavailable("presence_add", exc) from exc
        return bool(added)

    async def presence_remove(self, channel: str, client_id: str) -> None:
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hdel(self._key("p", channel), client_id)
                pipe.zrem(self._key("z", channel), client_id)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise _unavailable("presence_remove", exc) from exc

    async def presence(self, channel: str) -> list[bytes]:
        keys = [self._key("p", channel), self._key("z", channel)]
        try:
            entries = await self._presence_script(keys=keys, args=[self._topic(channel)])
        except (RedisError, OSError) as exc:
            raise _unavailable("presence", exc) from exc
        return list(entries)

    async def presence_expire(self, channel: str) -> None:
        keys = [self._key("p", channel), self._key("z", channel)]
        try:
            await self._presence_expire_script(keys=keys, args=[self._topic(channel)])
        except (RedisError, OSError) as exc:
            raise _unavailable("presence_expire", exc) from exc

    async def has_subscribers(self, channel: str) -> bool:
        """Any worker subscribed: each worker holds one SUBSCRIBE per channel (PUBSUB NUMSUB)."""
        try:
            counts = await self._redis.pubsub_numsub(self._topic(channel))
        except (RedisError, OSError) as exc:
            raise _unavailable("has_subscribers", exc) from exc
        return bool(counts) and int(counts[0][1]) > 0

    # -- between workers ---------------------------------------------------------------------

    async def signal(self, data: bytes) -> None:
        try:
            await self._redis.publish(self._signals, data)
        except (RedisError, OSError) as exc:
            raise _unavailable("signal", exc) from exc

    def _registry_key(self, key: str) -> str:
        return self._key("r", key)

    async def register(self, key: str, value: bytes, ttl: float) -> None:
        try:
            await self._redis.set(self._registry_key(key), value, px=max(1, round(ttl * 1000)))
        except (RedisError, OSError) as exc:
            raise _unavailable("register", exc) from exc

    async def lookup(self, key: str) -> bytes | None:
        try:
            value = await self._redis.get(self._registry_key(key))
        except (RedisError, OSError) as exc:
            raise _unavailable("lookup", exc) from exc
        return value.encode() if isinstance(value, str) else value

    async def unregister(self, key: str) -> None:
        try:
            await self._redis.delete(self._registry_key(key))
        except (RedisError, OSError) as exc:
            raise _unavailable("unregister", exc) from exc

    # -- subscriptions ---------------------------------------------------------------------

    async def subscribe(self, channel: str) -> None:
        """Subscribe once per channel; returns when Redis confirmed the SUBSCRIBE.

        Waits up to ``CONNECT_TIMEOUT`` for a pub/sub connection being re-established.
        Raises ``BrokerUnavailable`` (and forgets the channel) when it cannot be confirmed.
        """
        if channel in self._channels:
            return
        topic = self._topic(channel)
        self._channels[channel] = topic
        self._topics[topic] = channel
        try:
            await asyncio.wait_for(self._connected.wait(), CONNECT_TIMEOUT)
            pubsub = self._pubsub
            if pubsub is None:
                raise RedisConnectionError("pub/sub connection lost")
            confirmed = asyncio.get_running_loop().create_future()
            self._waiters.setdefault(topic, []).append(confirmed)
            await pubsub.subscribe(topic)
            await asyncio.wait_for(confirmed, COMMAND_TIMEOUT)
        except BaseException as exc:
            if self._channels.get(channel) == topic:
                del self._channels[channel]
                self._topics.pop(topic, None)
            if isinstance(exc, RedisError | OSError | TimeoutError | BrokerUnavailable):
                raise _unavailable("subscribe", exc) from exc
            raise

    async def unsubscribe(self, channel: str) -> None:
        """Forget the channel; never raises (a lost connection resubscribes without it)."""
        topic = self._channels.pop(channel, None)
        if topic is None:
            return
        self._topics.pop(topic, None)
        pubsub = self._pubsub
        if pubsub is not None:
            try:
                await pubsub.unsubscribe(topic)
            except (RedisError, OSError) as exc:
                logger.debug("UNSUBSCRIBE %s failed: %s", channel, exc)

    # -- the pub/sub reader ------------------------------------------------------------------

    async def _run(self, pubsub: PubSub | None) -> None:
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
            if pubsub is None:
                try:
                    pubsub = await self._open_pubsub()
                except (RedisError, OSError) as exc:
                    failures += 1
                    log = logger.warning if failures == 1 else logger.debug
                    log("Redis pub/sub: cannot connect (%s); attempt %d", exc, failures)
                    continue
            opened = loop.time()
            resync = self._ever_connected
            self._ever_connected = True
            self._pubsub = pubsub
            self._connected.set()
            if resync:
                self.reconnects += 1
                logger.warning(
                    "Redis pub/sub reconnected: resyncing %d channels", len(self._channels)
                )
                self._notify_resync()
            try:
                await self._read(pubsub)
            except (RedisError, OSError) as exc:
                logger.warning("Redis pub/sub connection lost (%s); reconnecting", exc)
            except Exception:
                logger.exception("Redis pub/sub reader failed; reconnecting")
            finally:
                self._connected.clear()
                self._pubsub = None
                self._fail_waiters()
                await _discard(pubsub)
            pubsub = None
            failures = failures + 1 if loop.time() - opened < self.reconnect_cap else 0

    async def _open_pubsub(self) -> PubSub:
        """A connected PubSub subscribed to every channel, each SUBSCRIBE confirmed.

        Publications that arrive meanwhile are dispatched as usual (in order).
        """
        pubsub = self._redis.pubsub()
        try:
            await pubsub.connect()  # type: ignore[no-untyped-call]
            topics = list(self._topics)
            for i in range(0, len(topics), self.subscribe_batch):
                await pubsub.subscribe(*topics[i : i + self.subscribe_batch])
            pending = set(topics)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + COMMAND_TIMEOUT
            while pending:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise RedisTimeoutError("SUBSCRIBE not confirmed in time")
                message = await pubsub.get_message(timeout=remaining)
                if message is not None:
                    self._dispatch(message)
                    if message["type"] == "subscribe":
                        pending.discard(message["channel"])
            stale = [topic for topic in topics if topic not in self._topics]
            if stale:  # unsubscribed while we were connecting
                await pubsub.unsubscribe(*stale)
        except BaseException:
            await _discard(pubsub)
            raise
        return pubsub

    async def _read(self, pubsub: PubSub) -> None:
        loop = asyncio.get_running_loop()
        last_seen = last_ping = loop.time()
        while True:
            message = await pubsub.get_message(timeout=1.0)
            now = loop.time()
            if message is not None:
                last_seen = now
                self._dispatch(message)
                continue
            idle = now - last_seen
            if idle > self.ping_interval + COMMAND_TIMEOUT:
                raise RedisTimeoutError(f"no reply from Redis for {idle:.1f}s")
            if idle >= self.ping_interval and now - last_ping >= self.ping_interval:
                last_ping = now
                await pubsub.ping()

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "message":
            channel = self._topics.get(message["channel"])
            if channel is SIGNALS:
                if self._on_signal is not None:
                    try:
                        self._on_signal(bytes(message["data"]))
                    except Exception:
                        logger.exception("signal handler failed")
                return
            if channel is None or self._on_message is None:
                return  # unsubscribed meanwhile
            try:
                decoded = _decode(channel, message["data"])
            except ValueError:
                logger.error("malformed message on %s: %.80r", channel, message["data"])
                return
            try:
                self._on_message(decoded)
            except Exception:
                logger.exception("message handler failed on %s", channel)
        elif kind == "subscribe":
            for waiter in self._waiters.pop(message["channel"], ()):
                if not waiter.done():
                    waiter.set_result(None)

    def _notify_resync(self) -> None:
        if self._on_resync is not None:
            try:
                self._on_resync()
            except Exception:
                logger.exception("resync handler failed")

    def _fail_waiters(self) -> None:
        waiters, self._waiters = self._waiters, {}
        for futures in waiters.values():
            for waiter in futures:
                if not waiter.done():
                    waiter.set_exception(BrokerUnavailable("Redis pub/sub connection lost"))


def _unavailable(operation: str, exc: BaseException) -> BrokerUnavailable:
    """``BrokerUnavailable`` for ``exc``; errors that are not about reachability are logged,
    since they point at a bug or a misconfigured Redis rather than an outage."""
    outage = RedisConnectionError | RedisTimeoutError | OSError | TimeoutError | BrokerUnavailable
    if not isinstance(exc, outage):
        logger.error("Redis %s failed: %r", operation, exc)
    return BrokerUnavailable(f"Redis {operation} failed: {exc}")


async def _discard(pubsub: PubSub) -> None:
    try:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
    except (RedisError, OSError) as exc:
        logger.debug("closing the pub/sub connection: %s", exc)


def _decode(channel: str, payload: bytes) -> Message:
    """A pub/sub payload (see the module docstring) as a ``Publication`` or ``PresenceEvent``."""
    kind = payload[:1]
    if kind == b"p":
        offset, epoch, stamp, data = payload[1:].split(b" ", 3)
        return Publication(channel, int(offset), epoch.decode(), data, published_at=float(stamp))
    if kind == b"e":
        event, client = payload[1:].split(b" ", 1)
        return PresenceEvent(channel, event.decode(), client)
    raise ValueError("unknown message kind")


def _entry(channel: str, epoch: str, entry: list[Any]) -> Publication:
    """A history stream entry ``[b"0-<offset>", [b"d", data, b"t", time]]``."""
    entry_id, raw = entry
    fields = dict(zip(raw[::2], raw[1::2], strict=True))
    return Publication(
        channel,
        int(entry_id.rpartition(b"-")[2]),
        epoch,
        fields[b"d"],
        published_at=float(fields[b"t"]),
    )
