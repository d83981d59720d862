"""The pub/sub connection of one worker: a connection redis-py opens, read by hiredis.

redis-py's pool opens it as it opens any (TLS, AUTH, CLIENT SETNAME, a Sentinel's master);
from then on its socket's bytes go to a hiredis reader in ``data_received`` and every
message is handed to ``on_message`` in that same callback: no task wakes per message or
per read, so a publication is fanned out in the loop turn it arrives in. Commands queued
in one loop turn go out in one write, consecutive SUBSCRIBEs as one command. Through
redis-py's ``PubSub`` a message cost ~12 µs of CPU to read and a new topic ~75 µs to
subscribe (its command machinery, then one ``get_message`` per confirmation); this way
~1 µs and ~15 µs.

It reads redis-py's connection's stream writer (``_writer``), a private part: the
``redis`` pin in pyproject.toml is the range the suite has passed on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast

import hiredis
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

MessageHandler = Callable[[bytes, bytes], None]  # topic, payload
ReplyHandler = Callable[[Any], None]  # any other reply: confirmations, PONG
MESSAGES = (b"message", b"smessage")
MERGED = (b"SUBSCRIBE", b"UNSUBSCRIBE")  # one command may name any topics (not S*: one slot)


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
        self._queue: list[tuple[bytes, tuple[bytes, ...]]] = []
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

    def _flush(self) -> None:
        queue, self._queue = self._queue, []
        if self.lost.done():
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
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as exc:
                self.fail(RedisConnectionError(f"Redis sent what is not RESP: {exc}"))
                return
            if reply is False:
                return
            if isinstance(reply, list) and reply[0] in MESSAGES and len(reply) == 3:
                on_message(reply[1], reply[2])
            elif isinstance(reply, hiredis.ReplyError):
                self.fail(ResponseError(str(reply)))  # e.g. MOVED: a slot changed hands
                return
            else:
                self._on_reply(reply)

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

    async def close(self) -> None:
        """Close the connection and give it back to the pool. Idempotent."""
        self.fail(RedisConnectionError("pub/sub connection closed"))
        if not self._released:
            self._released = True
            await _release(self._pool, self._connection)


def _pack(command: bytes, topics: list[bytes]) -> bytes:
    # hiredis's stub types the argument as a 1-tuple; any tuple of bytes is packed.
    packed: bytes = hiredis.pack_command((command, *topics))  # type: ignore[arg-type]
    return packed


async def _release(pool: ConnectionPool, connection: AbstractConnection) -> None:
    try:
        await connection.disconnect()
    finally:
        await pool.release(connection)
