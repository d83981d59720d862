"""A client connection as the hub sees it: identity, subscriptions, and a bounded outbound queue.

Backpressure: ``push`` never awaits. When the session has nothing queued or in
flight, the transport writes the item at once, synchronously (``write_now``):
the gateway's own server protocols take the ready-made bytes straight to the
socket; under another ASGI server the send coroutine is stepped once
(``start_write``) and finishes without suspending while the socket is writable.
Either way the fan-out loop writes to every ready client in one pass, as
``websockets.broadcast()`` does, with no task wake-up per delivery. When the
socket is full the item queues (or the half-run send is kept) and the session's
writer task, started only then (``writer_on_demand``), drains the queue in
batches once the socket takes writes again. When the bytes waiting in the queue
pass ``max_queue_bytes`` the session is closed with ``SLOW_CONSUMER`` and its
queue dropped: one client that stops reading never slows the others and never
makes memory grow without bound.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from channels.lite import LiteEvent
from channels.publication import Batch, PresenceEvent, Publication, compact

SLOW_CONSUMER = (4008, "slow consumer")


@dataclass(slots=True, frozen=True)
class Gap:
    """Marks that a channel's history was lost (new epoch) before the next push."""

    channel: str


Outgoing = Publication | PresenceEvent | Batch | Gap | str  # str: an encoded reply


class Transport(Protocol):
    """Writes what the session queued. WebSocket and SSE differ only here."""

    async def write(self, batch: list[Outgoing]) -> None: ...

    def write_now(self, item: Outgoing) -> Started:
        """Start writing ``item`` (see ``start_write``); ``NOT_NOW`` when it cannot start.
        Raises ``OSError`` (``ConnectionError``) when the client is gone."""


class _NotNow:
    """The transport cannot write yet (e.g. the response has not started): queue the item."""


NOT_NOW = _NotNow()


@dataclass(slots=True)
class InFlight:
    """A send coroutine that suspended on ``waiting_for`` (the socket was not writable)."""

    coro: Generator[Any, None, None]
    waiting_for: Any


Started = InFlight | _NotNow | None  # None: written completely


def start_write(send: Awaitable[None]) -> InFlight | None:
    """Run ``send`` until it first suspends. None when it finished without suspending.

    Exceptions raised before the first suspension propagate to the caller.
    """
    coro = send.__await__()
    try:
        waiting_for = coro.send(None)
    except StopIteration:
        return None
    return InFlight(coro, waiting_for)


async def finish_write(flight: InFlight) -> None:
    """Drive a suspended send to its end from the writer task, as a Task would have."""
    coro, waiting_for = flight.coro, flight.waiting_for
    while True:
        try:
            if isinstance(waiting_for, asyncio.Future):
                waiting_for._asyncio_future_blocking = False
                await waiting_for
            else:  # a bare yield (asyncio.sleep(0))
                await asyncio.sleep(0)
        except BaseException:
            coro.close()
            raise
        try:
            waiting_for = coro.send(None)
        except StopIteration:
            return


def new_client_id() -> str:
    return "c-" + secrets.token_hex(8)


class Session:
    __slots__ = (
        "_in_flight",
        "_queue",
        "_queued_bytes",
        "_start_writer",
        "_transport",
        "_wakeup",
        "_writing",
        "abort",
        "channels",
        "client_id",
        "close_reason",
        "info",
        "max_queue_bytes",
        "observe_latency",
        "presence_entry",
        "transport_name",
        "user",
    )

    def __init__(
        self,
        transport: Transport,
        *,
        user: str,
        info: dict[str, object],
        max_queue_bytes: int,
        transport_name: str,
        observe_latency: Callable[[float], None] | None = None,
    ) -> None:
        self._transport = transport
        self.transport_name = transport_name
        self.client_id = new_client_id()
        self.user = user
        self.info = info
        self.presence_entry = compact(
            orjson.dumps({"client": self.client_id, "user": user, "info": info})
        )
        self.channels: set[str] = set()
        self.max_queue_bytes = max_queue_bytes
        self.observe_latency = observe_latency
        self._queue: list[Outgoing] = []  # written whole by the writer: no deque needed
        self._queued_bytes = 0
        self._in_flight: InFlight | None = None
        self._writing = False  # the writer task is inside transport.write
        self._wakeup = LiteEvent()  # idle sessions are the common case: no waiter deque
        self.close_reason: tuple[int, str] | None = None
        # Set by the transport: stops an in-flight write when the client is too slow.
        self.abort: Callable[[], object] | None = None
        self._start_writer: Callable[[], object] | None = None

    def __repr__(self) -> str:
        return f"<Session {self.client_id} user={self.user!r} {self.transport_name}>"

    @property
    def queued_bytes(self) -> int:
        return self._queued_bytes

    def push(self, item: Outgoing) -> bool:
        """Write or queue ``item`` without waiting. False when closing or just overflowed."""
        if self.close_reason is not None:
            return False
        if not self._queue and self._in_flight is None and not self._writing:
            try:
                started = self._transport.write_now(item)
            except OSError:  # the client is gone (ConnectionError); the reader sees it too
                self.close(1000, "")
                return False
            if started is None:
                return True
            if isinstance(started, InFlight):
                self._in_flight = started
                self._wakeup.set()
                self._need_writer()
                return True
        if isinstance(item, str):
            size = len(item)
        elif isinstance(item, Gap):
            size = 64
        elif isinstance(item, Batch):
            size = item.size
        else:
            size = len(item.json)
        self._queued_bytes += size
        if self._queued_bytes > self.max_queue_bytes:
            self._queue.clear()
            self._queued_bytes = 0
            self.close(*SLOW_CONSUMER)
            if self.abort is not None:
                self.abort()
            return False
        self._queue.append(item)
        self._wakeup.set()
        self._need_writer()
        return True

    def close(self, code: int, reason: str) -> None:
        """Ask for the session to end; the first reason given wins. Idempotent."""
        if self.close_reason is None:
            self.close_reason = (code, reason)
            self._wakeup.set()
            self._need_writer()

    def writer_on_demand(self, start: Callable[[], object] | None) -> None:
        """Have ``start`` (which starts a task running ``run_writer``) called only once
        the writer is needed: an item has to queue, a write suspended, or the session
        closes. Most sessions are written directly and never need one; None: never."""
        self._start_writer = start
        if start is not None and (self._queue or self._in_flight or self.close_reason):
            self._need_writer()

    def _need_writer(self) -> None:
        start = self._start_writer
        if start is not None:
            self._start_writer = None
            start()

    @property
    def slow(self) -> bool:
        return self.close_reason == SLOW_CONSUMER

    async def write_until_closed(self) -> bool:
        """Run the writer in the current task until the session is closed and flushed.

        A slow consumer's ``close`` cancels a write stuck on a full socket (``abort``);
        that cancellation is absorbed here. False when the client went away mid-write.
        """
        task = asyncio.current_task()
        assert task is not None
        self.abort = task.cancel
        try:
            await self.run_writer()
        except asyncio.CancelledError:
            if not self.slow:
                raise
            task.uncancel()
        except OSError:
            return False
        return True

    async def run_writer(self) -> None:
        """Finish a suspended direct write, then drain the queue, until closed and empty."""
        queue = self._queue
        while True:
            if self._in_flight is not None:
                try:
                    await finish_write(self._in_flight)
                finally:
                    self._in_flight = None
                continue
            if not queue:
                if self.close_reason is not None:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = list(queue)
            queue.clear()
            self._queued_bytes = 0
            self._writing = True
            try:
                await self._transport.write(batch)
            finally:
                self._writing = False
            if self.observe_latency is not None:
                for item in batch:
                    first = item.messages[0] if isinstance(item, Batch) else item
                    if isinstance(first, Publication):
                        self.observe_latency(time.time() - first.published_at)
                        break
