"""What travels through the hub: publications (with an offset) and presence events.

Each message is encoded once, lazily, and the same bytes/str are handed to
every local subscriber: ``frame`` for WebSocket text frames, ``json`` for SSE
``data:`` lines. The transports cache their whole wire form on the message too
(``ws``, ``sse``) so that it is built once per publication, not once per client.
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


def compact(data: bytes) -> bytes:
    """``data`` in an object of its own size, for bytes that are kept.

    ``orjson.dumps`` returns bytes that keep the whole output buffer alive (4 KiB
    for a 60-byte result); kept per connection or in history that adds up.
    """
    return bytes(memoryview(data))


def _encoded(push: dict[str, Any]) -> tuple[bytes, str]:
    """A push as JSON bytes (SSE ``data:``) and as ``str`` (a WebSocket text frame)."""
    encoded = compact(orjson.dumps(push))
    return encoded, encoded.decode()


@dataclass(slots=True)
class Publication:
    """One publication in a channel. ``data`` is the JSON encoding of the payload."""

    channel: str
    offset: int
    epoch: str
    data: bytes
    published_at: float = field(default_factory=time.time)
    _encoded: tuple[bytes, str] | None = field(default=None, repr=False)
    # The whole SSE event for one-channel streams, whose cursor depends on this publication only.
    sse: bytes | None = field(default=None, repr=False)
    # The same event framed as one HTTP/1.1 chunk, for raw writes (gateway.httpprotocol).
    sse_chunk: bytes | None = field(default=None, repr=False)
    # The whole WebSocket frame (header + ``json``), the same bytes for every subscriber.
    ws: bytes | None = field(default=None, repr=False)

    def _encode(self) -> tuple[bytes, str]:
        if self._encoded is None:
            self._encoded = _encoded(
                {
                    "channel": self.channel,
                    "offset": self.offset,
                    "epoch": self.epoch,
                    "data": orjson.Fragment(self.data),
                }
            )
        return self._encoded

    @property
    def json(self) -> bytes:
        """The push, ``{"channel","offset","epoch","data"}``, encoded once."""
        return self._encode()[0]

    @property
    def frame(self) -> str:
        """The push as a WebSocket text frame (decoded once for all subscribers)."""
        return self._encode()[1]

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
    _encoded: tuple[bytes, str] | None = field(default=None, repr=False)
    ws: bytes | None = field(default=None, repr=False)

    def _encode(self) -> tuple[bytes, str]:
        if self._encoded is None:
            self._encoded = _encoded(
                {
                    "channel": self.channel,
                    "event": self.event,
                    "client": orjson.Fragment(self.client),
                }
            )
        return self._encoded

    @property
    def json(self) -> bytes:
        return self._encode()[0]

    @property
    def frame(self) -> str:
        return self._encode()[1]


Message = Publication | PresenceEvent


@dataclass(slots=True)
class Batch:
    """Consecutive messages of one channel that reached the hub in the same loop pass.

    Under load several publications arrive between two fan-out passes; the hub hands
    them to each subscriber as one item, so a client costs one socket write per pass
    instead of one per publication. The transports cache the joined wire form here.
    """

    messages: list[Message]
    ws: bytes | None = field(default=None, repr=False)
    sse_chunk: bytes | None = field(default=None, repr=False)

    @property
    def size(self) -> int:
        return sum(len(message.json) for message in self.messages)
