"""The pub/sub connection of one worker: a connection redis-py opens, read by hiredis.

redis-py's pool opens it as it opens any (TLS, AUTH, CLIENT SETNAME, a Sentinel's master);
from then on its socket's bytes go to a hiredis reader in ``data_received`` and every
message is handed to ``on_message`` in that same callback: no task wakes per message or
per read, so a publication is fanned out in the loop turn it arrives in. Commands queued
in one loop turn go out in one write, consecutive SUBSCRIBEs as one command. On a RESP3
connection (redis-py's default) other commands can follow a SUBSCRIBE in the same write
(``call``): Redis runs them once the subscription is live, and their replies (not
pushes) come back in order. Through redis-py's ``PubSub`` a message cost ~12 µs of CPU
to read and a new topic ~75 µs to subscribe (its command machinery, then one
``get_message`` per confirmation); this way ~1 µs and ~15 µs.

It reads redis-py's connection's stream writer (``_writer``), a private part: the
``redis`` pin in pyproject.toml is the range the suite has passed on.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Any, cast

import hiredis
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from channels.backends.redis.errors import REDIS_ERRORS

logger = logging.getLogger(__name__)

MessageHandler = Callable[[bytes, bytes], None]  # topic, payload
ReplyHandler = Callable[[Any], None]  # any other reply: confirmations, PONG
MESSAGES = (b"message", b"smessage")
PUSH = hiredis.PushNotification  # RESP3's out-of-band replies (RESP2 has only arrays)
MERGED = (b"SUBSCRIBE", b"UNSUBSCRIBE")  # one command may name any topics (not S*: one slot)
# Error replies that are about the connection's subscriptions, never a call's (ACLs, a
# Cluster's slots): they end the connection.
FATAL = (b"NOPERM", b"MOVED", b"ASK", b"CROSSSLOT", b"CLUSTERDOWN")


class PubSubLink(asyncio.Protocol):
    """One open pub/sub connection. ``lost`` is done, with the error, once it is gone."""

    merge_limit = 1000  # topics per merged command

    def __init__(
        self,
        pool: ConnectionPool,
        connection: AbstractConnection,
        on_message: MessageHandler,
        on_reply: ReplyHandler,
    ) -> None:
        self._pool, self._connection = pool, connection
        self._on_message, self._on_reply = on_message, on_reply
        self._loop = asyncio.get_running_loop()
        self._reader = hiredis.Reader()
        self._queue: list[tuple[bytes, tuple[Any, ...]]] = []
        # RESP3: what each reply that is not a push answers, in order (None: a PING's).
        self._calls: deque[asyncio.Future[Any] | None] = deque()
        self.answered = 0  # calls answered so far (the reader's watch: progress)
        self.resp3 = connection.get_protocol() in (3, "3")  # type: ignore[no-untyped-call]
        self.lost: asyncio.Future[BaseException] = self._loop.create_future()
        self.last_seen = self._loop.time()
        self._released = False
        writer = connection._writer  # private (see the module docstring)
        if writer is None:
            raise RedisConnectionError("the pub/sub connection is not open")
        self._transport: asyncio.Transport = writer.transport  # type: ignore[assignment]
        # The stream protocol redis-py reads through; told when the socket closes, so that
        # redis-py's own disconnect (waiting for that) works as usual.
        self._stream = cast("asyncio.Protocol", self._transport.get_protocol())
        self._transport.set_protocol(self)

    @classmethod
    async def open(
        cls, pool: ConnectionPool, on_message: MessageHandler, on_reply: ReplyHandler
    ) -> PubSubLink:
        """A connection from ``pool`` (released again by ``close``)."""
        connection = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            return cls(pool, connection, on_message, on_reply)
        except BaseException:
            await _release(pool, connection)
            raise

    # -- commands --------------------------------------------------------------------

    def send(self, command: bytes, *topics: bytes) -> None:
        """Queue ``command`` with ``topics``; written at the end of this loop turn."""
        if not self._queue:
            self._loop.call_soon(self._flush)
        self._queue.append((command, topics))

    def ping(self) -> None:
        self.send(b"PING")
        if self.resp3:
            self._calls.append(None)

    def call(self, command: bytes, *args: Any) -> asyncio.Future[Any]:
        """RESP3 only: queue a command whose reply sets the future (an error reply as a
        ``ResponseError``); it runs after every command queued before it."""
        if not self.resp3:
            raise RuntimeError("commands on a pub/sub connection need RESP3")
        reply: asyncio.Future[Any] = self._loop.create_future()
        self.send(command, *args)
        self._calls.append(reply)
        return reply

    @property
    def waiting(self) -> bool:
        """Calls (or a PING) wait for their replies."""
        return bool(self._calls)

    def _flush(self) -> None:
        queue, self._queue = self._queue, []
        if not queue or self.lost.done():
            return
        packed: list[bytes] = []
        command, topics = queue[0][0], list(queue[0][1])
        for name, more in queue[1:]:
            if name == command and name in MERGED and len(topics) < self.merge_limit:
                topics.extend(more)
                continue
            packed.append(_pack(command, topics))
            command, topics = name, list(more)
        packed.append(_pack(command, topics))
        self._transport.write(b"".join(packed))

    # -- the protocol ------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.last_seen = self._loop.time()
        reader = self._reader
        reader.feed(data)
        on_message = self._on_message
        # RESP2 has no pushes: every array is a message or a confirmation; on RESP3 an
        # array that is not a push is a call's reply.
        pushes = PUSH if self.resp3 else list
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as exc:
                self.fail(RedisConnectionError(f"Redis sent what is not RESP: {exc}"))
                return
            if reply is False:
                return
            if type(reply) is pushes:
                if len(reply) == 3 and reply[0] in MESSAGES:
                    on_message(reply[1], reply[2])
                else:
                    self._on_reply(reply)
            elif self._calls:
                if not self._answer(reply):
                    return
            elif isinstance(reply, hiredis.ReplyError):
                self.fail(ResponseError(str(reply)))  # e.g. MOVED: a slot changed hands
                return
            else:
                self._on_reply(reply)

    def _answer(self, reply: Any) -> bool:
        """Settle the oldest call with ``reply``; False when the reply ended the link."""
        if isinstance(reply, hiredis.ReplyError):
            error = ResponseError(str(reply))
            if str(reply).encode().startswith(FATAL):
                self.fail(error)
                return False
            reply = error
        waiter = self._calls.popleft()
        self.answered += 1
        if waiter is not None and not waiter.done():
            if isinstance(reply, ResponseError):
                waiter.set_exception(reply)
            else:
                waiter.set_result(reply)
        return True

    def eof_received(self) -> bool:
        self._stream.eof_received()
        self._lose(RedisConnectionError("Redis closed the connection"))
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._stream.connection_lost(exc)
        self._lose(RedisConnectionError(f"pub/sub connection lost: {exc or 'closed'}"))

    def pause_writing(self) -> None:
        self._stream.pause_writing()

    def resume_writing(self) -> None:
        self._stream.resume_writing()

    # -- the end -----------------------------------------------------------------------

    def fail(self, error: BaseException) -> None:
        """End the connection with ``error`` as the reason ``lost`` gives."""
        self._lose(error)
        self._transport.close()

    def _lose(self, error: BaseException) -> None:
        if not self.lost.done():
            self.lost.set_result(error)
        calls, self._calls = self._calls, deque()
        for waiter in calls:
            if waiter is not None and not waiter.done():
                waiter.set_exception(RedisConnectionError(str(error)))

    @property
    def address(self) -> tuple[str, int]:
        """The Redis it is connected to (a Sentinel service's master: which one)."""
        connection: Any = self._connection
        return connection.host, connection.port

    async def discard(self) -> None:
        """``close``, a failure to close logged, not raised."""
        try:
            await self.close()
        except REDIS_ERRORS as exc:
            logger.debug("closing the pub/sub connection: %s", exc)

    async def close(self) -> None:
        """Close the connection and give it back to the pool. Idempotent."""
        self.fail(RedisConnectionError("pub/sub connection closed"))
        if not self._released:
            self._released = True
            await _release(self._pool, self._connection)


def _pack(command: bytes, args: list[Any]) -> bytes:
    packed: bytes = hiredis.pack_command((command, *args))
    return packed


async def _release(pool: ConnectionPool, connection: AbstractConnection) -> None:
    try:
        await connection.disconnect()
    finally:
        await pool.release(connection)
