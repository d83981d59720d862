"""The ``Broker`` protocol over Redis: offsets, history and fan-out (see the package
docstring for the guarantees, ``keys`` for the layout and payloads)."""

from __future__ import annotations

import functools
import logging
import secrets
import time
from typing import Any

from redis.typing import EncodableT

from channels.backends.redis.batched import BatchedScript, evalsha_each
from channels.backends.redis.cluster import ClusterConnection
from channels.backends.redis.errors import REDIS_ERRORS, unavailable
from channels.backends.redis.keys import Keys
from channels.backends.redis.link import Link
from channels.backends.redis.scripts import Scripts
from channels.broker import (
    BrokerOptions,
    HistoryPage,
    HistoryQuery,
    MessageHandler,
    ResyncHandler,
)
from channels.publication import Message, PresenceEvent, Publication, StreamPosition
from channels.tasks import gather_grouped

logger = logging.getLogger(__name__)


def new_epoch() -> str:
    return secrets.token_hex(4)


class RedisBroker:
    """One SUBSCRIBE per channel that has local subscribers, on the worker's one pub/sub
    connection; commands go through the connection's pool."""

    def __init__(
        self, connection: Link, keys: Keys, scripts: Scripts, options: BrokerOptions
    ) -> None:
        self.connection = connection
        self._keys = keys
        self._scripts = scripts
        self._options = options
        self._history_ttl_ms = max(1, round(options.history_ttl * 1000))
        meta_ttl = max(options.history_meta_ttl, options.history_ttl)
        self._meta_ttl_ms = max(1, round(meta_ttl * 1000))
        self._once_ttl_ms = max(1, round(options.idempotency_ttl * 1000))
        self._on_message: MessageHandler | None = None
        # A crowd's history reads of one loop turn in one pipeline (not a Cluster's:
        # redis-py takes no script in its pipeline).
        self._history: BatchedScript | None = None
        if not isinstance(connection, ClusterConnection):
            self._history = BatchedScript(connection.redis, scripts.history)

    @property
    def reconnects(self) -> int:
        return self.connection.reconnects

    async def start(self, on_message: MessageHandler, on_resync: ResyncHandler) -> None:
        """Connect the pub/sub reader (see ``Connection.start``)."""
        self._on_message = on_message
        topic = self._keys.topic
        await self.connection.start(lambda which: on_resync(lambda channel: which(topic(channel))))

    async def close(self) -> None:
        """Stop the reader and close every connection. Idempotent."""
        if self._history is not None:
            await self._history.close()
        await self.connection.close()
        self._on_message = None

    async def ready(self) -> bool:
        return await self.connection.ready()

    def _publish_call(
        self, channel: str, data: bytes, stamp: str
    ) -> tuple[list[str], list[EncodableT]]:
        """The keys and arguments of the publish script (``publish.lua``)."""
        options = self._options
        args: list[EncodableT] = [
            new_epoch(),
            data,
            stamp,
            options.history_size,
            self._history_ttl_ms,
            self._meta_ttl_ms,
            self._keys.topic(channel),
        ]
        return [self._keys.meta(channel), self._keys.history(channel)], args

    async def publish(self, channel: str, data: bytes) -> Publication:
        stamp = f"{time.time():.6f}"
        keys, args = self._publish_call(channel, data, stamp)
        try:
            offset, epoch = await self._scripts.publish(keys=keys, args=args)
        except REDIS_ERRORS as exc:
            raise unavailable("publish", exc) from exc
        return Publication(channel, int(offset), epoch.decode(), data, published_at=float(stamp))

    async def publish_once(self, channel: str, data: bytes, key: str) -> tuple[Publication, bool]:
        """The publish script after a look for the key (``publish_seen.lua``), in one call."""
        stamp = f"{time.time():.6f}"
        keys, args = self._publish_call(channel, data, stamp)
        keys.append(self._keys.once(channel, key))
        args.append(self._once_ttl_ms)
        try:
            reply = await self._scripts.publish_once(keys=keys, args=args)
        except REDIS_ERRORS as exc:
            raise unavailable("publish_once", exc) from exc
        offset, epoch = int(reply[0]), reply[1].decode()
        return Publication(channel, offset, epoch, data, published_at=float(stamp)), len(reply) < 3

    async def publish_many(self, channel: str, datas: list[bytes]) -> list[Publication]:
        """One script call and one pub/sub message for them all (a ``b`` message, see
        ``keys``); a single one goes as by ``publish``, in the older format."""
        if len(datas) <= 1:
            return [await self.publish(channel, data) for data in datas]
        stamp = f"{time.time():.6f}"
        options = self._options
        args: list[EncodableT] = [
            new_epoch(),
            stamp,
            options.history_size,
            self._history_ttl_ms,
            self._meta_ttl_ms,
            self._keys.topic(channel),
            *datas,
        ]
        keys = [self._keys.meta(channel), self._keys.history(channel)]
        try:
            first, raw_epoch = await self._scripts.publish_many(keys=keys, args=args)
        except REDIS_ERRORS as exc:
            raise unavailable("publish_many", exc) from exc
        offset, epoch, at = int(first), raw_epoch.decode(), float(stamp)
        return [
            Publication(channel, offset + i, epoch, data, published_at=at)
            for i, data in enumerate(datas)
        ]

    async def publish_each(self, channels: list[str], data: bytes) -> list[Publication]:
        """The publish script for each channel, pipelined: one round trip (a Cluster's
        pipeline sends each node its channels at once). Where Redis lost the script (a
        restart), it is loaded and those calls are sent again: a NOSCRIPT call ran
        nothing. redis-py refuses scripts in a Cluster's pipeline: there every channel
        is published at once, concurrently (the repeats of one channel in turn)."""
        if len(channels) <= 1:
            return [await self.publish(channel, data) for channel in channels]
        if isinstance(self.connection, ClusterConnection):

            async def in_turn(channel: str, repeats: list[str]) -> list[Publication]:
                return [await self.publish(channel, data) for _ in repeats]

            return await gather_grouped(channels, lambda channel: channel, in_turn)
        stamp = f"{time.time():.6f}"
        calls = [self._publish_call(channel, data, stamp) for channel in channels]
        try:
            replies = await evalsha_each(self.connection.redis, self._scripts.publish, calls)
        except REDIS_ERRORS as exc:
            raise unavailable("publish_each", exc) from exc
        for reply in replies:
            if isinstance(reply, Exception):
                raise unavailable("publish_each", reply)
        at = float(stamp)
        return [
            Publication(channel, int(offset), epoch.decode(), data, published_at=at)
            for channel, (offset, epoch) in zip(channels, replies, strict=True)
        ]

    async def publish_event(self, channel: str, event: str, client: bytes) -> None:
        payload = b"e" + event.encode() + b" " + client
        try:
            await self.connection.publish(self._keys.topic(channel), payload)
        except REDIS_ERRORS as exc:
            raise unavailable("publish_event", exc) from exc

    def _history_call(
        self, channel: str, since: StreamPosition | None, limit: int | None
    ) -> tuple[list[str], list[EncodableT]]:
        args: list[EncodableT] = [
            new_epoch(),
            self._meta_ttl_ms,
            -1 if since is None else since.offset,
            "" if since is None else since.epoch,
            # History holds no more than its size: a larger limit (any integer a client
            # sends) is that, and never a number the script cannot take.
            -1 if limit is None else min(limit, self._options.history_size),
        ]
        return [self._keys.meta(channel), self._keys.history(channel)], args

    async def history(
        self, channel: str, *, since: StreamPosition | None = None, limit: int | None = None
    ) -> HistoryPage:
        keys, args = self._history_call(channel, since, limit)
        try:
            if self._history is not None:
                reply = await self._history(keys, args)
            else:
                reply = await self._scripts.history(keys=keys, args=args)
        except REDIS_ERRORS as exc:
            raise unavailable("history", exc) from exc
        return _page(channel, reply)

    async def subscribe(self, channel: str, read: HistoryQuery | None = None) -> HistoryPage | None:
        """Returns once Redis confirmed the SUBSCRIBE: a history read made after it cannot
        miss a publication that the subscription did not see either. With ``read``, on a
        RESP3 connection, that read is the history script sent behind the SUBSCRIBE on the
        pub/sub connection (``Connection.subscribe``'s ``then``): its page, one round trip."""
        handler = functools.partial(self._received, channel)
        topic = self._keys.topic(channel)
        if read is None:
            await self.connection.subscribe(topic, handler)
            return None
        keys, args = self._history_call(channel, read.since, read.limit)
        script = (b"EVALSHA", self._scripts.history.sha, len(keys), *keys, *args)
        reply = await self.connection.subscribe(topic, handler, script)
        return None if reply is None else _page(channel, reply)

    async def unsubscribe(self, channel: str) -> None:
        await self.connection.unsubscribe(self._keys.topic(channel))

    async def has_subscribers(self, channel: str) -> bool:
        """Any worker subscribed: each worker holds one SUBSCRIBE per channel (PUBSUB NUMSUB)."""
        try:
            return await self.connection.subscriber_count(self._keys.topic(channel)) > 0
        except REDIS_ERRORS as exc:
            raise unavailable("has_subscribers", exc) from exc

    def _received(self, channel: str, payload: bytes) -> None:
        on_message = self._on_message
        if on_message is None:
            return
        try:
            message = _decode(channel, payload)
        except ValueError:
            logger.error("malformed message on %s: %.80r", channel, payload)
            return
        if isinstance(message, list):
            for publication in message:
                on_message(publication)
        else:
            on_message(message)


def _decode(channel: str, payload: bytes) -> Message | list[Publication]:
    """A pub/sub payload (see ``keys``) as a ``Publication`` or ``PresenceEvent``, or a
    batch as its publications in offset order. Raises ``ValueError`` when malformed."""
    kind = payload[:1]
    if kind == b"p":
        offset, epoch, stamp, data = payload[1:].split(b" ", 3)
        return Publication(channel, int(offset), epoch.decode(), data, published_at=float(stamp))
    if kind == b"b":
        return _decode_batch(channel, payload[1:])
    if kind == b"e":
        event, client = payload[1:].split(b" ", 1)
        return PresenceEvent(channel, event.decode(), client)
    raise ValueError("unknown message kind")


def _decode_batch(channel: str, body: bytes) -> list[Publication]:
    """``<first offset> <epoch> <time> <length>,<length>,… <data><data>…`` (``keys``)."""
    first, raw_epoch, stamp, lengths, datas = body.split(b" ", 4)
    offset, epoch, at = int(first), raw_epoch.decode(), float(stamp)
    publications = []
    end = 0
    for n, length in enumerate(lengths.split(b",")):
        start, end = end, end + int(length)
        data = datas[start:end]
        publications.append(Publication(channel, offset + n, epoch, data, published_at=at))
    if end != len(datas):
        raise ValueError("batch lengths do not add up")
    return publications


def _page(channel: str, reply: list[Any]) -> HistoryPage:
    """The history script's reply: epoch, top offset, status (0: not recoverable, 2:
    newest first) and the stream entries."""
    raw_epoch, top, status, entries = reply
    epoch = raw_epoch.decode()
    position = StreamPosition(int(top), epoch)
    if status == 0:
        return HistoryPage([], position, complete=False)
    publications = [_entry(channel, epoch, entry) for entry in entries]
    if status == 2:
        publications.reverse()
    return HistoryPage(publications, position)


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
