"""One channel's stream of items, deduplicated by (epoch, offset) across reconnects.

The contract already promises that a connection never receives the same (channel,
epoch, offset) twice and that offsets of one epoch arrive in increasing order; the
subscription keeps that true across connections too: a push at or below the last
delivered offset of the same epoch is dropped. A push with another epoch than the last
delivered one, or a resubscription the gateway could not recover (``recovered: false``),
yields a ``Gap`` first.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

from gatewayclient.errors import CLOSED, GatewayError
from gatewayclient.items import ItemQueue, notify
from gatewayclient.models import (
    Gap,
    Item,
    Position,
    PresenceEvent,
    Publication,
    Subscribed,
    SubscriptionEvent,
)


class Subscription:
    """An async iterator of ``Publication``, ``Gap`` and ``PresenceEvent`` items.

    The buffer is unbounded: a consumer that stops iterating holds what arrives in memory
    (the gateway itself cuts a connection that stops reading, which a reading client with
    a slow consumer here never is). Iteration ends after ``unsubscribe()`` or the client's
    ``close()``; it raises ``GatewayError`` if the gateway refused a resubscription.
    ``on_event`` is called with ``Subscribed`` on every subscribe reply and with each
    ``Gap`` as it is queued.
    """

    def __init__(
        self,
        channel: str,
        since: Position | None = None,
        on_event: Callable[[SubscriptionEvent], object] | None = None,
    ) -> None:
        self.channel = channel
        self.on_event = on_event
        self.position = since  # of the last delivered publication, or the subscribe reply
        self.recovered: bool | None = None  # of the last (re)subscription that had a since
        self.active = True
        # Publications dropped as already delivered: a gateway that keeps the contract
        # sends none (a resubscription resumes after the last delivered offset).
        self.repeats = 0
        self._items = ItemQueue(f"subscription to {channel} ended")
        # Resolved by the first subscribe reply (an error reply: its GatewayError).
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.ready.add_done_callback(lambda f: f.cancelled() or f.exception())

    # -- from the transport --------------------------------------------------

    def since(self) -> dict[str, Any] | None:
        return self.position.as_since() if self.position is not None else None

    def on_subscribed(self, result: dict[str, Any]) -> None:
        """A subscribe reply: ``{"offset", "epoch", "recovered"?}``."""
        top = Position(str(result["epoch"]), int(result["offset"]))
        last = self.position
        if last is None:
            self.position = top
            notify(self.on_event, Subscribed(self.channel, top, None))
            return
        self.recovered = bool(result.get("recovered"))
        notify(self.on_event, Subscribed(self.channel, top, self.recovered))
        if not self.recovered:
            self.gap("epoch" if top.epoch != last.epoch else "history", top.epoch, top.offset)
            self.position = top

    def gap(
        self, reason: Literal["history", "epoch"], epoch: str | None, offset: int | None
    ) -> None:
        last = self.position
        gap = Gap(
            self.channel,
            reason,
            last.epoch if last else None,
            last.offset if last else None,
            epoch,
            offset,
        )
        self._items.put(gap)
        notify(self.on_event, gap)

    def on_push(self, push: dict[str, Any]) -> None:
        event = push.get("event")
        if event in ("join", "leave"):
            self._items.put(PresenceEvent(self.channel, event, push.get("client") or {}))
            return
        if "offset" not in push:
            return  # a push of a kind this client does not know (forward compatibility)
        pub = Publication(self.channel, int(push["offset"]), str(push["epoch"]), push.get("data"))
        last = self.position
        if last is not None and pub.epoch == last.epoch and pub.offset <= last.offset:
            self.repeats += 1  # already delivered
            return
        if last is not None and pub.epoch != last.epoch:
            self.gap("epoch", pub.epoch, pub.offset - 1)
        self.position = Position(pub.epoch, pub.offset)
        self._items.put(pub)

    def fail(self, error: GatewayError) -> None:
        if not self.ready.done():
            self.ready.set_exception(error)
        if self.active:
            self.active = False
            self._items.fail(error)

    def end(self) -> None:
        if not self.ready.done():  # a subscribe() still waiting for its reply ends too
            self.ready.set_exception(GatewayError(CLOSED, f"subscription to {self.channel} ended"))
        if self.active:
            self.active = False
            self._items.end()

    # -- for the application ---------------------------------------------------

    def __aiter__(self) -> AsyncIterator[Item]:
        return self

    async def __anext__(self) -> Item:
        return await self._items.next()

    async def get(self, timeout: float | None = None) -> Item:
        """The next item, waiting at most ``timeout`` seconds (``TimeoutError``)."""
        return await self._items.get(timeout)
