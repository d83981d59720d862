"""What travels through the hub: publications (with an offset) and presence events.

These are data. How they look on a WebSocket or an SSE stream is the gateway's
business (``gateway.wire``); each message has one slot, ``wire``, where the
gateway keeps the bytes it built for it, so that they are built once per
message and not once per subscriber.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import orjson


@dataclass(slots=True, unsafe_hash=True)
class StreamPosition:
    """Where a channel's stream is: a value (hashable, never changed: the fields are
    ``Final``, which mypy holds every assignment to). Not ``frozen``: a frozen
    dataclass's ``__init__`` sets each field through ``object.__setattr__``, three times
    the cost of a plain one, for the position of every subscribe that recovers."""

    offset: Final[int]
    epoch: Final[str]


def compact(data: bytes) -> bytes:
    """``data`` in an object of its own size, for bytes that are kept.

    ``orjson.dumps`` returns bytes that keep the whole output buffer alive (4 KiB
    for a 60-byte result); kept per connection or in history that adds up.
    """
    return bytes(memoryview(data))


# The highest offset anything takes from a client (a WebSocket's ``since``, a stream's
# cursor, the history API's ``since_offset``): Redis counts a channel's offsets in a
# signed 64-bit integer.
MAX_OFFSET: Final = 2**63 - 1


def offset_from_text(text: str) -> int | None:
    """An offset written as text (a stream's cursor, an HTTP query): decimal digits from 0
    to ``MAX_OFFSET``; None for anything else (a sign, a space, ``_``, another script's
    digits, which ``int()`` would take)."""
    if not (text.isascii() and text.isdigit()) or len(text) > 19:
        return None
    number = int(text)
    return number if number <= MAX_OFFSET else None


# What a push adds to its payload on the wire, roughly (names, offset, epoch, framing):
# used to count a queue's bytes without encoding anything.
_OVERHEAD = 64


@dataclass(slots=True)
class Publication:
    """One publication in a channel. ``data`` is the JSON encoding of the payload."""

    channel: str
    offset: int
    epoch: str
    data: bytes
    published_at: float = field(default_factory=time.time)
    # The gateway's encodings of this publication (gateway.wire), built on first use.
    wire: Any = field(default=None, repr=False, compare=False)
    _position: StreamPosition | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def position(self) -> StreamPosition:
        """Built once: every SSE stream of the channel keeps it as its position."""
        position = self._position
        if position is None:
            position = self._position = StreamPosition(self.offset, self.epoch)
        return position

    @property
    def size(self) -> int:
        """About how many bytes this push takes on the wire."""
        return len(self.data) + len(self.channel) + _OVERHEAD

    def history_entry(self) -> dict[str, Any]:
        return {"offset": self.offset, "data": orjson.Fragment(self.data)}


@dataclass(slots=True)
class PresenceEvent:
    """A join or leave push. Not stored, no offset."""

    channel: str
    event: str  # "join" | "leave"
    client: bytes  # JSON of {"client", "user", "info"}
    wire: Any = field(default=None, repr=False, compare=False)

    @property
    def size(self) -> int:
        return len(self.client) + len(self.channel) + _OVERHEAD


Message = Publication | PresenceEvent


@dataclass(slots=True)
class Batch:
    """Consecutive messages of one channel that reached the hub in the same loop pass.

    Under load several publications arrive between two fan-out passes; the hub hands
    them to each subscriber as one item, so a client costs one socket write per pass
    instead of one per publication.
    """

    messages: list[Message]
    wire: Any = field(default=None, repr=False, compare=False)
    _size: int = field(default=-1, init=False, repr=False, compare=False)

    @property
    def size(self) -> int:
        """Summed once: a replay's batches are pushed to every session resuming from
        where they start."""
        size = self._size
        if size < 0:
            size = self._size = sum(message.size for message in self.messages)
        return size


def in_batches(publications: Sequence[Publication], batch_bytes: int) -> list[Publication | Batch]:
    """``publications`` as the items a resuming session is pushed: consecutive ones
    together, in batches of about ``batch_bytes`` (a lone one as itself)."""
    items: list[Publication | Batch] = []
    batch: list[Publication] = []
    size = 0
    for publication in publications:
        batch.append(publication)
        size += publication.size
        if size >= batch_bytes:
            items.append(batch[0] if len(batch) == 1 else Batch([*batch]))
            batch, size = [], 0
    if batch:
        items.append(batch[0] if len(batch) == 1 else Batch([*batch]))
    return items
