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
