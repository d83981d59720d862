"""SSE cursors: the position of every channel of one stream, as one ``id:`` value.

Format (opaque to clients, documented in docs/protocol.md)::

    channel~epoch~offset,channel~epoch~offset

``~`` and ``,`` cannot appear in channel names; epochs are restricted to
``[A-Za-z0-9_-]``. ``decode`` rejects anything else with ``ValueError``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Protocol

from channels.names import is_valid_channel
from channels.publication import StreamPosition, offset_from_text

EPOCH_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_CURSOR_CHARS = 64 * 1024


class Position(Protocol):
    """A channel position: a ``StreamPosition``, or a ``Publication`` (where it is)."""

    @property
    def offset(self) -> int: ...

    @property
    def epoch(self) -> str: ...


def encode(positions: Mapping[str, Position]) -> str:
    if len(positions) == 1:  # (most streams: one channel, no list to join)
        for ch, p in positions.items():
            return f"{ch}~{p.epoch}~{p.offset}"
    return ",".join([f"{ch}~{p.epoch}~{p.offset}" for ch, p in positions.items()])


def decode(cursor: str) -> dict[str, StreamPosition]:
    if len(cursor) > MAX_CURSOR_CHARS:
        raise ValueError("cursor too long")
    positions: dict[str, StreamPosition] = {}
    if not cursor:
        return positions
    for entry in cursor.split(","):
        parts = entry.split("~")
        if len(parts) != 3:
            raise ValueError("malformed cursor entry")
        channel, epoch, offset = parts
        if not is_valid_channel(channel) or not EPOCH_RE.fullmatch(epoch):
            raise ValueError("malformed cursor entry")
        number = offset_from_text(offset)
        if number is None:
            raise ValueError("malformed cursor offset")
        positions[channel] = StreamPosition(number, epoch)
    return positions
