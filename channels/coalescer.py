"""Publishes to one channel that meet go to the broker in one call.

While a publish to channel C is in flight, later publishes to C wait in C's queue; when
it returns, everything queued goes in one ``Broker.publish_many`` (one Redis script, one
pub/sub message), up to ``max_items`` publications and ``max_bytes`` of data; what is
left waits for the next call. A publish to a channel with nothing in flight goes out at
once on its caller's task, as a plain ``Broker.publish``: at light load nothing waits,
nothing changes. Under load a round trip carries what arrived during the previous one,
so the calls per channel adapt to the load with no timer and no tuning.

Guarantees, per channel:

* Order: one call in flight at a time, the queue in arrival order, so offsets follow
  the order in which ``publish``/``publish_many`` were called.
* A request (one ``publish``, or one ``publish_many``) is never split: its publications
  get consecutive offsets in one broker call, all or none. Requests bigger than the
  limits go alone.
* Each caller gets its own publications, or the exception of the call that carried its
  request, as from a call of its own; one request's failure is no other queued
  request's business (the next call is tried).
* Cancellation: a caller cancelled while its request waits in the queue takes it out
  (never published). Once the request is in a call in flight, that call completes for
  the others: the cancelled caller's publications may be published, as a cancelled
  ``Broker.publish`` may have been, without it hearing of them. Nothing is lost or
  published twice for anyone else.

The calls after the first run in a task per busy channel, owned here; ``close`` cancels
them and their callers get ``BrokerUnavailable``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from channels.broker import BrokerUnavailable
from channels.publication import Publication
from channels.tasks import Tasks

logger = logging.getLogger(__name__)

# A call carries at most this much (a request bigger than that goes alone). From 256 to
# 1000 a call, Redis CPU per publication falls only from about 5 to 2 µs (50-80 µs one
# per call), while the call's round trip - what the queue behind it waits, and what
# every other Redis command waits - doubles. 256 KiB is a quarter of the default
# GATEWAY_CLIENT_QUEUE_BYTES: one batch reaches a subscriber as one item.
# docs/benchmarks.md, "Batched publish".
MAX_ITEMS = 256
MAX_BYTES = 256 * 1024


def batches(
    datas: list[bytes], max_items: int = MAX_ITEMS, max_bytes: int = MAX_BYTES
) -> list[list[bytes]]:
    """``datas`` cut, in order, into lists that each fit one call."""
    out: list[list[bytes]] = []
    batch: list[bytes] = []
    size = 0
    for data in datas:
        if batch and (len(batch) >= max_items or size + len(data) > max_bytes):
            out.append(batch)
            batch, size = [], 0
        batch.append(data)
        size += len(data)
    if batch:
        out.append(batch)
    return out


class Publisher(Protocol):
    """What the coalescer needs of a ``Broker``."""

    async def publish(self, channel: str, data: bytes) -> Publication: ...

    async def publish_many(self, channel: str, datas: list[bytes]) -> list[Publication]: ...


@dataclass(slots=True)
class _Request:
    datas: list[bytes]
    size: int
    future: asyncio.Future[list[Publication]]


class Coalescer:
    """Per channel: one broker call in flight, the rest queued for the next one."""

    def __init__(
        self, broker: Publisher, *, max_items: int = MAX_ITEMS, max_bytes: int = MAX_BYTES
    ) -> None:
        self._broker = broker
        self.max_items = max_items
        self.max_bytes = max_bytes
        # Channels with a call in flight -> the requests waiting for the next one.
        self._busy: dict[str, deque[_Request]] = {}
        self._tasks = Tasks(logger)
        self._closed = False

    async def publish(self, channel: str, data: bytes) -> Publication:
        queue = self._busy.get(channel)
        if queue is not None:
            return (await self._wait(queue, [data]))[0]
        queue = self._busy[channel] = deque()
        try:
            return await self._broker.publish(channel, data)
        finally:
            self._next(channel, queue)

    async def publish_many(self, channel: str, datas: list[bytes]) -> list[Publication]:
        """``datas`` in one broker call (after what is in flight or queued for the
        channel): consecutive offsets, all published or none."""
        if not datas:
            return []
        queue = self._busy.get(channel)
        if queue is not None:
            return await self._wait(queue, datas)
        queue = self._busy[channel] = deque()
        try:
            return await self._call(channel, datas)
        finally:
            self._next(channel, queue)

    def queued(self, channel: str) -> int | None:
        """Requests waiting for the next call on ``channel``; None when nothing is in
        flight there (the next publish goes out at once)."""
        queue = self._busy.get(channel)
        return None if queue is None else len(queue)

    async def close(self) -> None:
        """Cancel the calls in flight; their callers and the queued ones get
        ``BrokerUnavailable``, and so do later ones that would queue. Idempotent."""
        self._closed = True
        await self._tasks.cancel()
        for channel, queue in list(self._busy.items()):
            self._fail(channel, queue, [])

    # -- internals ------------------------------------------------------------------

    async def _wait(self, queue: deque[_Request], datas: list[bytes]) -> list[Publication]:
        future: asyncio.Future[list[Publication]] = asyncio.get_running_loop().create_future()
        queue.append(_Request(datas, sum(map(len, datas)), future))
        # Cancelling the caller cancels ``future``: ``_take`` then skips the request.
        return await future

    async def _call(self, channel: str, datas: list[bytes]) -> list[Publication]:
        if len(datas) == 1:
            return [await self._broker.publish(channel, datas[0])]
        return await self._broker.publish_many(channel, datas)

    def _next(self, channel: str, queue: deque[_Request]) -> None:
        """The caller's own call on ``channel`` returned: what queued meanwhile goes next,
        from a task of its own; with nothing queued the channel is idle again."""
        if self._busy.get(channel) is not queue:
            return  # closed meanwhile
        while queue and queue[0].future.done():
            queue.popleft()
        if not queue:
            del self._busy[channel]
        elif self._closed:
            self._fail(channel, queue, [])
        else:
            self._tasks.spawn(self._drain(channel, queue), f"publish:{channel}")

    async def _drain(self, channel: str, queue: deque[_Request]) -> None:
        """Send the queue, one call after the other, until it is empty."""
        batch: list[_Request] = []
        try:
            while batch := self._take(queue):
                datas = batch[0].datas if len(batch) == 1 else [d for r in batch for d in r.datas]
                try:
                    publications = await self._call(channel, datas)
                except Exception as exc:  # BrokerUnavailable, or a bug: as for a call of its own
                    for request in batch:
                        if not request.future.done():
                            request.future.set_exception(exc)
                    continue
                start = 0
                for request in batch:
                    end = start + len(request.datas)
                    if not request.future.done():
                        request.future.set_result(publications[start:end])
                    start = end
            if self._busy.get(channel) is queue:
                del self._busy[channel]
        except BaseException:
            self._fail(channel, queue, batch)
            raise

    def _take(self, queue: deque[_Request]) -> list[_Request]:
        """The requests of the next call, from the head of ``queue``: at least one, then
        as many as fit the limits. Requests of cancelled callers are dropped."""
        batch: list[_Request] = []
        items = size = 0
        while queue:
            request = queue[0]
            if request.future.done():
                queue.popleft()
                continue
            count = len(request.datas)
            if batch and (items + count > self.max_items or size + request.size > self.max_bytes):
                break
            queue.popleft()
            batch.append(request)
            items += count
            size += request.size
        return batch

    def _fail(self, channel: str, queue: deque[_Request], batch: list[_Request]) -> None:
        """Closed (or a bug): every caller still waiting on ``channel`` gets an error."""
        if self._busy.get(channel) is queue:
            del self._busy[channel]
        closed = BrokerUnavailable("the publisher is closed")
        for request in [*batch, *queue]:
            if not request.future.done():
                request.future.set_exception(closed)
        queue.clear()
