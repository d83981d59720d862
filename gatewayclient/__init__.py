"""An asyncio client of the gateway: WebSocket (``connect``), SSE (``SseClient``) and the
HTTP API for backends (``Publisher``). It needs only websockets, httpx and orjson, not
the gateway's server side. See docs/client-python.md."""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import Any

from gatewayclient.connection import Client
from gatewayclient.errors import GatewayError
from gatewayclient.models import (
    Gap,
    History,
    Item,
    Position,
    PresenceEvent,
    Publication,
    PublishResult,
    StateChange,
    Subscribed,
    SubscriptionEvent,
)
from gatewayclient.publisher import Publisher, StreamResult
from gatewayclient.sse import SseClient
from gatewayclient.subscription import Subscription

__all__ = [
    "Client",
    "Gap",
    "GatewayError",
    "History",
    "Item",
    "Position",
    "PresenceEvent",
    "Publication",
    "PublishResult",
    "Publisher",
    "SseClient",
    "StateChange",
    "StreamResult",
    "Subscribed",
    "Subscription",
    "SubscriptionEvent",
    "connect",
]


class connect:  # lower case: used like a function, as websockets' connect
    """``client = await connect(url, token=…)`` or ``async with connect(url, …) as client``.

    Takes ``Client``'s arguments; returns once the first connection is established."""

    def __init__(self, url: str | Sequence[str], **options: Any) -> None:
        self.client = Client(url, **options)

    async def _open(self) -> Client:
        try:
            await self.client.start()
        except BaseException:
            await self.client.close()
            raise
        return self.client

    def __await__(self) -> Generator[Any, None, Client]:
        return self._open().__await__()

    async def __aenter__(self) -> Client:
        return await self._open()

    async def __aexit__(self, *exc: object) -> None:
        await self.client.close()
