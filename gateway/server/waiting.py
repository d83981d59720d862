"""``asyncio.Event`` and ``asyncio.Queue`` without their idle cost, for the server's protocols.

Every connection owns a few of these for its whole life, and nearly always nobody
is waiting on them. ``asyncio.Event`` keeps an empty ``deque`` of waiters and
``asyncio.Queue`` three of them; at tens of thousands of idle connections that is
kilobytes per connection for nothing (docs/benchmarks.md). These keep ``None``
until someone actually waits or something is queued. They implement only what
uvicorn's protocols call: ``is_set/set/clear/wait`` and
``put_nowait/get/get_nowait/empty/qsize``.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Final, Generic, TypeVar

T = TypeVar("T")


class LiteEvent:
    """An ``asyncio.Event`` whose waiter list exists only while someone waits."""

    def __init__(self) -> None:
        self.flag = False  # ``is_set()``, as an attribute for the paths that read it often
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self.flag

    def set(self) -> None:
        if self.flag:
            return
        self.flag = True
        waiters, self._waiters = self._waiters, None
        if waiters:
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def clear(self) -> None:
        self.flag = False

    async def wait(self) -> bool:
        if self.flag:
            return True
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        try:
            await waiter  # a cancelled waiter cancels only its own future
        finally:
            self._forget(waiter)
        return True

    def _forget(self, waiter: asyncio.Future[None]) -> None:
        # (A method of its own: ``self._waiters`` read as declared, None included, not
        # as the list ``wait`` saw before its await, which compiled code would insist on.)
        waiters = self._waiters
        if waiters is not None and waiter in waiters:
            waiters.remove(waiter)
            if not waiters:
                self._waiters = None


class WriteFlow:
    """A protocol's side of its transport's flow control (``pause_writing`` /
    ``resume_writing``), for the paths that write without waiting: ``write_paused`` is an
    attribute to read, and the event a waiting writer needs is made when writing first
    pauses (most connections never wait). Subclasses set both in their ``__init__``
    (no base call per connection)."""

    write_paused: bool
    _writable: LiteEvent | None

    def pause_writing(self) -> None:
        self.write_paused = True
        if self._writable is None:
            self._writable = LiteEvent()
        else:
            self._writable.clear()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self._writable is not None:
            self._writable.set()

    def wake_writers(self) -> None:
        """The connection is lost: a waiting writer returns (and learns it)."""
        if self._writable is not None:
            self._writable.set()

    async def resumed(self) -> None:
        """Until writing resumes or the connection is lost (writing is paused)."""
        assert self._writable is not None, "wait only while writing is paused"
        await self._writable.wait()


class LiteQueue(Generic[T]):
    """An unbounded queue for one consumer; no buffers while empty.

    ``on_put``, when set, is called after each ``put_nowait``: a consumer that runs
    no task while the queue is empty starts one from there.
    """

    def __init__(self) -> None:
        self._items: deque[T] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.on_put: Callable[[], object] | None = None

    def put_nowait(self, item: T) -> None:
        if self._items is None:
            self._items = deque()
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self.on_put is not None:
            self.on_put()

    def empty(self) -> bool:
        return not self._items

    def qsize(self) -> int:
        return len(self._items) if self._items else 0

    def get_nowait(self) -> T:
        items = self._items
        if not items:
            raise asyncio.QueueEmpty
        item = items.popleft()
        if not items:
            self._items = None
        return item

    async def get(self) -> T:
        while not self._items:
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        return self.get_nowait()

    def __repr__(self) -> str:
        return f"<LiteQueue size={self.qsize()}>"


UNSENT_GRACE: Final = 5.0  # seconds a closed connection may take to send what it holds


def close_transport(transport: asyncio.Transport, grace: float = UNSENT_GRACE) -> None:
    """Close ``transport`` once what it holds is sent, and abort it if that has not
    happened ``grace`` seconds later: a client that does not read (a slow
    consumer cut, a keep-alive timed out) would otherwise hold the socket, its file
    descriptor and its buffer for as long as it keeps the connection open."""
    transport.close()
    if transport.get_write_buffer_size():
        asyncio.get_running_loop().call_later(grace, transport.abort)
