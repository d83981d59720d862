"""A client connection as the hub sees it: identity, subscriptions, and a bounded outbound queue.

Backpressure: ``push`` never awaits. When the session has nothing queued and no
write in progress, the transport writes the item at once if the client's socket
can take it (``Transport.write_now``): the fan-out loop writes to every ready
client in one pass, as ``websockets.broadcast()`` does, with no task wake-up per
delivery. Otherwise the item queues, and the session's writer (``run_writer``, in
a task the transport starts only then: ``writer_on_demand``) writes the queue in
batches as the socket drains. When the bytes waiting in the queue pass
``max_queue_bytes``, or one write waits longer than ``send_timeout`` for the
socket (``_WriteWatch``), the session is closed as a slow consumer
(``Ending.SLOW_CONSUMER``) and its queue dropped: one client that stops reading
never slows the others and never makes memory grow without bound.

Why a session ends is the transport's to put into a close code: ``close(reason)``
keeps whatever reason it is given, first one wins; the session itself only ever
gives an ``Ending``.
"""

from __future__ import annotations

import asyncio
import enum
import os
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol

import orjson

from channels.publication import (
    Batch,
    PresenceEvent,
    Publication,
    StreamPosition,
    compact,
    in_batches,
)


class Ending(enum.Enum):
    """Why a session ended, where the session saw it itself."""

    CLIENT_GONE = "client gone"  # a write failed: the connection is closed
    SLOW_CONSUMER = "slow consumer"  # over its queue bound, or a write timed out


@dataclass(slots=True, frozen=True)
class Gap:
    """Marks that a channel's history was lost (new epoch) before the next push.

    ``position`` is where the channel goes on from (the next push is the first after
    it): an SSE stream's cursor holds it from the gap on, so that a client that
    reconnects with the gap's id resumes there instead of from the lost position. None:
    the stream's own position for the channel is that already. ``lost``: the channel
    goes on in the same epoch, past publications nobody can recover (only an offset that
    jumps would show it: a transport with no gap to tell must end the connection)."""

    channel: str
    position: StreamPosition | None = None
    lost: bool = False


class Unrecoverable(Exception):
    """What a transport raises at a ``lost`` gap it cannot tell its client of: the
    session ends with ``reason``, nothing more written (``Session.cut``)."""

    def __init__(self, reason: object) -> None:
        super().__init__(reason)
        self.reason = reason


# bytes: a command's reply as JSON, for one WebSocket client; str: a piece of an SSE
# stream written as it is (a heartbeat)
Outgoing = Publication | PresenceEvent | Batch | Gap | bytes | str

_GAP_SIZE: Final = 64
# Recovered publications go out in batches of about this many bytes: a few small ones are
# one socket write, and a large recovery still queues (and counts towards the session's
# GATEWAY_CLIENT_QUEUE_BYTES) behind a socket that is full, instead of one huge write.
REPLAY_BATCH_BYTES: Final = 16_384


class Transport(Protocol):
    """Writes what the session hands it. WebSocket and SSE differ only here."""

    def write_now(self, item: Outgoing) -> bool:
        """Write ``item`` at once if the client's socket can take it; False: not now
        (the session queues it). Raises ``OSError`` when the client is gone, and
        ``Unrecoverable`` at a ``lost`` gap it cannot tell its client of."""

    async def write(self, batch: list[Outgoing]) -> None:
        """Write ``batch``, waiting for the socket as long as it takes (up to a ``lost``
        gap it cannot tell: then ``Unrecoverable``)."""


# Client ids are 8 random bytes (``secrets.token_hex(8)``) taken from the kernel 4 KiB at a
# time: a system call per 512 connections, not one each. A forked child starts with none
# of its parent's bytes, which would repeat its parent's ids.
class _RandomHex:
    def __init__(self) -> None:
        self.hex = ""
        self.at = 0


_random: Final = _RandomHex()  # (an object's attributes: no module dictionary per id)


def new_client_id() -> str:
    random = _random
    at = random.at
    if at >= len(random.hex):
        random.hex, at = os.urandom(4096).hex(), 0
    random.at = at + 16
    return "c-" + random.hex[at : at + 16]


def _forget_random_hex() -> None:
    _random.hex, _random.at = "", 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_random_hex)


def _size(item: Outgoing) -> int:
    if isinstance(item, bytes | str):
        return len(item)
    if isinstance(item, Gap):
        return _GAP_SIZE
    return item.size


def _messages(item: Outgoing) -> int:
    """The deliveries ``item`` was counted as (a reply, a gap: none)."""
    if isinstance(item, Batch):
        return len(item.messages)
    return 1 if isinstance(item, (Publication, PresenceEvent)) else 0


class Session:
    def __init__(
        self,
        transport: Transport,
        *,
        user: str,
        info: dict[str, object],
        max_queue_bytes: int,
        transport_name: str,
        send_timeout: float | None = None,
        observe_latency: Callable[[float], None] | None = None,
        client_id: str | None = None,
    ) -> None:
        self._transport = transport
        self.transport_name = transport_name
        self.client_id = client_id or new_client_id()
        self.user = user
        self.info = info
        self._presence_entry: bytes | None = None
        self.channels: set[str] = set()
        self.max_queue_bytes = max_queue_bytes
        self.send_timeout = send_timeout
        self.observe_latency = observe_latency
        # Written whole by the writer (no deque needed); made by the first item that
        # queues: most sessions are written directly and never queue one.
        self._queue: list[Outgoing] | None = None
        self._queued_bytes = 0
        self._writing = False  # the writer is inside transport.write
        # The writer waiting for work; idle sessions are the common case: no Event each.
        self._waiter: asyncio.Future[None] | None = None
        self._writer: asyncio.Task[object] | None = None
        self._aborted = False
        self._start_writer: Callable[[], object] | None = None
        self.close_reason: object = None
        self.dropped = 0  # messages counted as delivered and never written (``cut``)

    def __repr__(self) -> str:
        return f"<Session {self.client_id} user={self.user!r} {self.transport_name}>"

    @property
    def presence_entry(self) -> bytes:
        """The session in presence (join, leave, the member list), built on first use:
        most sessions never join a channel with presence."""
        entry = self._presence_entry
        if entry is None:
            member = {"client": self.client_id, "user": self.user, "info": self.info}
            entry = self._presence_entry = compact(orjson.dumps(member))
        return entry

    @property
    def queued_bytes(self) -> int:
        return self._queued_bytes

    @property
    def slow(self) -> bool:
        return self.close_reason is Ending.SLOW_CONSUMER

    def push_replay(self, publications: list[Publication]) -> None:
        """Push recovered ``publications`` in items of about ``REPLAY_BATCH_BYTES``."""
        for item in in_batches(publications, REPLAY_BATCH_BYTES):
            self.push(item)

    def push(self, item: Outgoing) -> bool:
        """Write or queue ``item`` without waiting. False when closing or just overflowed."""
        if self.close_reason is not None:
            return False
        if not self._queue and not self._writing:
            try:
                if self._transport.write_now(item):
                    return True
            except OSError:  # the client is gone (ConnectionError); its reader sees it too
                self.close(Ending.CLIENT_GONE)
                return False
            except Unrecoverable as lost:
                self.cut(lost.reason)
                return False
        self._queued_bytes += _size(item)
        if self._queued_bytes > self.max_queue_bytes:
            self.dropped += _messages(item)
            self._too_slow()
            self.abort()  # its writer may be stuck on a full socket
            return False
        if self._queue is None:
            self._queue = [item]
        else:
            self._queue.append(item)
        self._wake_writer()
        return True

    def close(self, reason: object) -> None:
        """Ask for the session to end with ``reason``; the first reason given wins.
        What is queued is still written (a slow consumer's queue is dropped). Idempotent."""
        if self.close_reason is None:
            self.close_reason = reason
            self._wake_writer()

    def abort(self) -> None:
        """Abandon the write in progress (a client that does not read): the writer's task
        is cancelled and ``run_writer`` returns. For a slow consumer, and for a drain
        whose deadline passed."""
        self._aborted = True
        writer = self._writer
        if writer is not None and not writer.done():
            writer.cancel()

    def take_queued(self) -> list[Outgoing] | None:
        """What queued while the transport could not write yet (a resume's publications,
        before an SSE response started), handed to the caller to write first, with what
        opens the stream. Nothing while a writer runs or the session closes: the writer
        writes it then."""
        if self._writer is not None or self._writing or self.close_reason is not None:
            return None
        queued, self._queue = self._queue, None
        self._queued_bytes = 0
        return queued

    def writer_on_demand(self, start: Callable[[], object] | None) -> None:
        """Have ``start`` (which starts a task running ``run_writer``) called only once
        the writer is needed: an item has to queue or the session closes. Most sessions
        are written directly and never need one; None: never."""
        self._start_writer = start
        if start is not None and (self._queue or self.close_reason is not None):
            self._wake_writer()

    def _wake_writer(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)
            return
        start = self._start_writer
        if start is not None and self._writer is None:
            self._start_writer = None
            start()

    def _too_slow(self) -> None:
        self.cut(Ending.SLOW_CONSUMER)

    def cut(self, reason: object) -> None:
        """``close`` with what is queued dropped: nothing more reaches the client."""
        for item in self._queue or ():
            self.dropped += _messages(item)
        self._queue = None
        self._queued_bytes = 0
        self.close(reason)

    def _write_timed_out(self) -> None:
        self._too_slow()
        self.abort()

    async def run_writer(self) -> bool:
        """Write what is queued, in batches, until the session is closed and flushed.

        Returns True once closed and flushed (or aborted), False when the client went
        away mid-write.
        """
        task = asyncio.current_task()
        assert task is not None
        self._writer = task
        try:
            await self._drain_queue()
        except asyncio.CancelledError:
            if not self._aborted:
                raise
            task.uncancel()
        except OSError:
            self.close(Ending.CLIENT_GONE)
            return False
        return True

    async def _drain_queue(self) -> None:
        loop = asyncio.get_running_loop()
        watch = _watch(loop) if self.send_timeout is not None else None
        while True:
            batch = self._queue
            if not batch:
                if self.close_reason is not None:
                    return
                waiter = self._waiter = loop.create_future()
                try:
                    await waiter
                finally:
                    self._waiter = None
                continue
            self._queue = None  # (what is pushed meanwhile queues anew)
            self._queued_bytes = 0
            self._writing = True
            if watch is not None:
                watch.add(self)
            try:
                await self._transport.write(batch)
            except Unrecoverable as lost:  # (what came before it is written)
                self.cut(lost.reason)
            finally:
                self._writing = False
                if watch is not None:
                    watch.discard(self)
            if self.observe_latency is not None:
                self._observe(batch)

    def _observe(self, batch: list[Outgoing]) -> None:
        assert self.observe_latency is not None
        for item in batch:
            first = item.messages[0] if isinstance(item, Batch) else item
            if isinstance(first, Publication):
                self.observe_latency(time.time() - first.published_at)
                return


class _WriteWatch:
    """The sessions of one event loop that are in a write, and one timer that cuts off
    those whose write has waited longer than their ``send_timeout``.

    A timer per write (``asyncio.timeout``) would cost microseconds on every write of the
    writer tasks, most of which never wait; here a write costs a dict insert and delete,
    and the timer exists only while some write is in progress. A write is cut off within
    a quarter of its timeout after the deadline.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.deadlines: dict[Session, float] = {}
        self.tick = float("inf")
        self._timer: asyncio.TimerHandle | None = None

    def add(self, session: Session) -> None:
        assert session.send_timeout is not None
        self.deadlines[session] = self.loop.time() + session.send_timeout
        self.tick = min(self.tick, max(0.01, session.send_timeout / 4))
        if self._timer is None:
            self._timer = self.loop.call_later(self.tick, self._check)

    def discard(self, session: Session) -> None:
        self.deadlines.pop(session, None)

    def _check(self) -> None:
        self._timer = None
        now = self.loop.time()
        late = [session for session, deadline in self.deadlines.items() if deadline <= now]
        for session in late:
            del self.deadlines[session]
            session._write_timed_out()
        if self.deadlines:
            self._timer = self.loop.call_later(self.tick, self._check)


_watches: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _WriteWatch] = (
    weakref.WeakKeyDictionary()
)


def _watch(loop: asyncio.AbstractEventLoop) -> _WriteWatch:
    watch = _watches.get(loop)
    if watch is None:
        watch = _watches[loop] = _WriteWatch(loop)
    return watch
