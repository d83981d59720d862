"""What a subscription yields: publications, gaps and presence events."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True, slots=True)
class Publication:
    channel: str
    offset: int
    epoch: str
    data: Any


@dataclass(frozen=True, slots=True)
class Gap:
    """Publications between the last delivered position and the new one are lost to this
    subscriber: refetch your state. ``reason`` is ``"history"`` (the client was away longer
    than history covers) or ``"epoch"`` (the channel's history was lost: a new epoch).
    Positions unknown to the client (``None``) are those it never had or, over SSE,
    the gateway did not say."""

    channel: str
    reason: Literal["history", "epoch"]
    last_epoch: str | None
    last_offset: int | None
    epoch: str | None
    offset: int | None


@dataclass(frozen=True, slots=True)
class PresenceEvent:
    channel: str
    event: Literal["join", "leave"]
    client: dict[str, Any]


Item = Publication | Gap | PresenceEvent


@dataclass(frozen=True, slots=True)
class Position:
    epoch: str
    offset: int

    def as_since(self) -> dict[str, Any]:
        return {"offset": self.offset, "epoch": self.epoch}


@dataclass(frozen=True, slots=True)
class History:
    publications: list[Publication]
    offset: int
    epoch: str


@dataclass(frozen=True, slots=True)
class PublishResult:
    offset: int
    epoch: str


@dataclass(frozen=True, slots=True)
class StateChange:
    """What a client's ``on_state`` callback is given.

    * ``connecting``: an attempt to connect to ``url`` starts; ``code`` and ``reason`` say
      why when it is not the first one (how the last connection or attempt ended);
    * ``connected``: established (WebSocket: every channel resubscribed; SSE: the stream
      answered 200);
    * ``disconnected``: an established connection ended (``code``, ``reason``); the
      client reconnects by itself;
    * ``closed``: final, after ``close()`` (``code`` None) or a refusal that retrying
      cannot fix (WebSocket 4001 without a ``token_factory``; SSE 400, 403, 404, 401).

    ``code`` is a WebSocket close code, or for SSE the HTTP status of a refused request
    (None when the connection failed or the stream just ended)."""

    state: Literal["connecting", "connected", "disconnected", "closed"]
    url: str | None = None
    code: int | None = None
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Subscribed:
    """A (re)subscription the gateway answered: ``position`` is the channel's top then;
    ``recovered`` is None for a subscription without ``since``, else whether everything
    since the last delivered position will follow (False: a ``Gap`` comes first)."""

    channel: str
    position: Position
    recovered: bool | None


# What a subscription's ``on_event`` callback is given.
SubscriptionEvent = Subscribed | Gap
