"""A client connection as the hub sees it: identity, subscriptions, and a bounded outbound queue.

Backpressure: ``push`` never awaits. Items go into a queue drained by one writer
task per session (``run_writer``) that hands batches to the transport. When the
bytes waiting in the queue pass ``max_queue_bytes`` the session is closed with
``SLOW_CONSUMER`` and its queue dropped: one client that stops reading never
slows the others and never makes memory grow without bound.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import orjson

from channels.publication import PresenceEvent, Publication

SLOW_CONSUMER = (4008, "slow consumer")


@dataclass(slots=True, frozen=True)
class Gap:
    """Marks that a channel's history was lost (new epoch) before the next push."""

    channel: str


Outgoing = Publication | PresenceEvent | Gap | str  # str: an encoded reply


class Transport(Protocol):
    """Writes what the session queued. WebSocket and SSE differ only here."""

    async def write(self, batch: list[Outgoing]) -> None: ...


def new_client_id() -> str:
    return "c-" + secrets.token_hex(8)


class Session:
    __slots__ = (
        "_queue",
        "_queued_bytes",
        "_transport",
        "_wakeup",
        "abort",
        "channels",
        "client_id",
        "close_reason",
        "closing",
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
        self.presence_entry = orjson.dumps({"client": self.client_id, "user": user, "info": info})
        self.channels: set[str] = set()
        self.max_queue_bytes = max_queue_bytes
        self.observe_latency = observe_latency
        self._queue: deque[Outgoing] = deque()
        self._queued_bytes = 0
        self._wakeup = asyncio.Event()
        self.closing = asyncio.Event()
        self.close_reason: tuple[int, str] | None = None
        # Set by the transport: stops an in-flight write when the client is too slow.
        self.abort: Callable[[], object] | None = None

    def __repr__(self) -> str:
        return f"<Session {self.client_id} user={self.user!r} {self.transport_name}>"

    @property
    def queued_bytes(self) -> int:
        return self._queued_bytes

    def push(self, item: Outgoing) -> bool:
        """Queue ``item`` without waiting. False when the session is closing or just overflowed."""
        if self.close_reason is not None:
            return False
        if isinstance(item, str):
            size = len(item)
        elif isinstance(item, Gap):
            size = 64
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
        return True

    def close(self, code: int, reason: str) -> None:
        """Ask for the session to end; the first reason given wins. Idempotent."""
        if self.close_reason is None:
            self.close_reason = (code, reason)
            self.closing.set()
            self._wakeup.set()

    @property
    def slow(self) -> bool:
        return self.close_reason == SLOW_CONSUMER

    async def run_writer(self) -> None:
        """Drain the queue into the transport until closed and empty."""
        queue = self._queue
        while True:
            if not queue:
                if self.close_reason is not None:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = list(queue)
            queue.clear()
            self._queued_bytes = 0
            await self._transport.write(batch)
            if self.observe_latency is not None:
                for item in batch:
                    if isinstance(item, Publication):
                        self.observe_latency(time.time() - item.published_at)
                        break
