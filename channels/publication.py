"""What travels through the hub: publications (with an offset) and presence events.

Each message is encoded once, lazily, and the same bytes/str are handed to
every local subscriber: ``frame`` for WebSocket text frames, ``json`` for SSE
``data:`` lines.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import orjson


@dataclass(slots=True, frozen=True)
class StreamPosition:
    offset: int
    epoch: str


@dataclass(slots=True)
class Publication:
    """One publication in a channel. ``data`` is the JSON encoding of the payload."""

    channel: str
    offset: int
    epoch: str
    data: bytes
    published_at: float = field(default_factory=time.time)
    _json: bytes | None = field(default=None, repr=False)
    _frame: str | None = field(default=None, repr=False)
    # The whole SSE event for one-channel streams, whose cursor depends on this publication only.
    sse: bytes | None = field(default=None, repr=False)

    @property
    def json(self) -> bytes:
        """The push, ``{"channel","offset","epoch","data"}``, encoded once."""
        if self._json is None:
            self._json = orjson.dumps(
                {
                    "channel": self.channel,
                    "offset": self.offset,
                    "epoch": self.epoch,
                    "data": orjson.Fragment(self.data),
                }
            )
        return self._json

    @property
    def frame(self) -> str:
        """The push as a WebSocket text frame (decoded once for all subscribers)."""
        if self._frame is None:
            self._frame = self.json.decode()
        return self._frame

    @property
    def position(self) -> StreamPosition:
        return StreamPosition(self.offset, self.epoch)

    def history_entry(self) -> dict[str, Any]:
        return {"offset": self.offset, "data": orjson.Fragment(self.data)}


@dataclass(slots=True)
class PresenceEvent:
    """A join or leave push. Not stored, no offset."""

    channel: str
    event: str  # "join" | "leave"
    client: bytes  # JSON of {"client", "user", "info"}
    _json: bytes | None = None
    _frame: str | None = None

    @property
    def json(self) -> bytes:
        if self._json is None:
            self._json = orjson.dumps(
                {
                    "channel": self.channel,
                    "event": self.event,
                    "client": orjson.Fragment(self.client),
                }
            )
        return self._json

    @property
    def frame(self) -> str:
        if self._frame is None:
            self._frame = self.json.decode()
        return self._frame


Message = Publication | PresenceEvent
