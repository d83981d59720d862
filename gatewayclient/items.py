"""The buffer behind ``Subscription`` and ``SseClient`` iteration, and callback calls."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TypeVar

from gatewayclient.errors import CLOSED, GatewayError
from gatewayclient.models import Gap, Item, PresenceEvent, Publication

logger = logging.getLogger(__name__)

_END = object()
E = TypeVar("E")


class ItemQueue:
    """Items for one async iterator, then its end: ``end()`` (iteration stops) or
    ``fail(error)`` (iteration raises ``error``). Either is final: it is seen by every
    later read, and what is put after it is dropped. Unbounded."""

    def __init__(self, closed_message: str) -> None:
        self.closed_message = closed_message  # of the ``GatewayError`` that get() raises
        self.finished = False
        self._queue: asyncio.Queue[Item | GatewayError | object] = asyncio.Queue()

    def put(self, item: Item) -> None:
        if not self.finished:
            self._queue.put_nowait(item)

    def end(self) -> None:
        self._finish(_END)

    def fail(self, error: GatewayError) -> None:
        self._finish(error)

    def _finish(self, last: object) -> None:
        if not self.finished:
            self.finished = True
            self._queue.put_nowait(last)

    async def next(self) -> Item:
        """The next item; ``StopAsyncIteration`` after ``end()``, the error after ``fail()``."""
        item = await self._queue.get()
        if item is _END or isinstance(item, GatewayError):
            self._queue.put_nowait(item)  # for the next reader
            if isinstance(item, GatewayError):
                raise item
            raise StopAsyncIteration
        assert isinstance(item, Publication | Gap | PresenceEvent)
        return item

    async def get(self, timeout: float | None = None) -> Item:
        """The next item, waiting at most ``timeout`` seconds (``TimeoutError``); after the
        end, ``GatewayError("closed")``."""
        try:
            async with asyncio.timeout(timeout):
                return await self.next()
        except StopAsyncIteration:
            raise GatewayError(CLOSED, self.closed_message) from None


def notify(callback: Callable[[E], object] | None, event: E) -> None:
    """Call an application's callback; what it raises is logged, never propagated."""
    if callback is None:
        return
    try:
        callback(event)
    except Exception:
        logger.exception("a gatewayclient callback failed on %r", event)
