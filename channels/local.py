"""A channel as one worker's hub holds it: its sessions, by how far they are."""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from typing import Final

from channels.publication import Batch, Message, Publication, StreamPosition, in_batches
from channels.session import REPLAY_BATCH_BYTES, Session

# Positions a channel keeps a replay for (``replay_since``), until it moves on.
MAX_REPLAYS = 8


class Join:
    """A session whose subscribe is in flight: what arrives live meanwhile. (A plain
    class: compiled, its ``__init__`` is native, not a dataclass's generated Python.)"""

    def __init__(self) -> None:
        self.buffer: list[Message] = []


class SubscribeResult:
    """Where a subscription starts, and whether ``since`` was recovered. (A plain class:
    compiled, its ``__init__`` is native, not a dataclass's generated Python.)"""

    def __init__(self, position: StreamPosition, recovered: bool) -> None:
        self.position: Final = position
        self.recovered: Final = recovered


class LocalChannel:
    def __init__(self, name: str) -> None:
        self.name = name
        self.live: dict[Session, None] = {}  # insertion-ordered set
        self.joining: dict[Session, Join] = {}
        self.catching_up: dict[Session, StreamPosition] = {}
        self.epoch: str | None = None
        self.offset = 0
        self.upstream = False
        self.recovering: list[Message] | None = None
        # Messages for ``live`` not written yet: flushed at the end of the loop pass.
        self.pending: list[Message] | None = None
        # The last publications this worker relayed, without a hole, up to ``position``.
        self.recent: deque[Publication] | None = None
        # Set when a join in flight ends: subscribers that arrived meanwhile wait for it.
        self.settled: asyncio.Event | None = None
        # ``replay_since``'s answers for where the channel is now (``_replays_at``).
        self._replays: dict[StreamPosition, list[Publication | Batch]] | None = None
        self._replays_at: tuple[str | None, int] = (None, 0)
        self._position: StreamPosition | None = None  # ``position``'s, while it holds

    def __len__(self) -> int:
        return len(self.live) + len(self.joining) + len(self.catching_up)

    @property
    def position(self) -> StreamPosition:
        """The last publication this worker received of the channel (epoch set): one
        object while the channel stays there (each subscribe's reply holds it)."""
        epoch = self.epoch
        assert epoch is not None
        kept = self._position
        if kept is None or kept.offset != self.offset or kept.epoch != epoch:
            kept = self._position = StreamPosition(self.offset, epoch)
        return kept

    @property
    def relaying(self) -> bool:
        """The worker relays the channel and has received every publication of it, in
        order, up to ``position``: subscribed upstream, a position known, no recovery
        under way."""
        return (
            self.upstream and self.epoch is not None and self.recovering is None and bool(self.live)
        )

    def owed(self, since: StreamPosition | None) -> list[Publication | Batch] | None:
        """What a session joining from ``since`` (None: from where the channel is) is
        owed, from what this worker relayed (``Hub._join_live``); None when the worker
        does not relay the channel, or what it relayed does not reach back to ``since``:
        history must be read."""
        if not self.relaying:
            return None
        if since is None or since == self.position:
            return []
        return self.replay_since(since)

    def remove(self, session: Session) -> bool:
        if session in self.live:
            del self.live[session]
            return True
        return (
            self.joining.pop(session, None) is not None
            or self.catching_up.pop(session, None) is not None
        )

    def remember(self, publication: Publication, size: int) -> None:
        """Keep ``publication``, relayed in order, among the last ``size``; a hole or a
        new epoch starts over (the kept ones always end where the channel is). The
        channel moved on: replays made for where it was are dropped."""
        self._replays = None
        recent = self.recent
        if (
            recent
            and recent[-1].epoch == publication.epoch
            and recent[-1].offset + 1 == publication.offset
        ):
            recent.append(publication)
        elif size > 0:
            self.recent = deque((publication,), maxlen=size)

    def relayed_since(self, since: StreamPosition) -> list[Publication] | None:
        """Every publication after ``since`` up to where the channel is, from what this
        worker relayed (the same publications history holds: offsets are unique in an
        epoch); None when those do not reach back to ``since``."""
        recent = self.recent
        if not recent or since.epoch != self.epoch or since.offset >= self.offset:
            return None
        first, last = recent[0], recent[-1]
        if (
            last.offset != self.offset
            or last.epoch != self.epoch
            or first.offset > since.offset + 1
        ):
            return None
        return list(itertools.islice(recent, since.offset + 1 - first.offset, None))

    def replay_since(self, since: StreamPosition) -> list[Publication | Batch] | None:
        """``relayed_since`` as the items a resuming session is pushed (``in_batches``),
        made once for every session that resumes from ``since`` while the channel stays
        where it is: in a reconnect storm most of a channel's clients resume from the
        same publication, and each item is then encoded once for all of them."""
        replays = self._replays
        at = (self.epoch, self.offset)
        if replays is None or at != self._replays_at:
            replays = self._replays = {}
            self._replays_at = at
        items = replays.get(since)
        if items is None:
            relayed = self.relayed_since(since)
            if relayed is None:
                return None
            items = in_batches(relayed, REPLAY_BATCH_BYTES)
            if len(replays) < MAX_REPLAYS:
                replays[since] = items
        return items

    def seed(self, publications: list[Publication], size: int) -> None:
        """What a history read gave a joining subscriber, when it ends where the channel
        is and nothing is kept yet: the next subscribers resuming from there need none."""
        if self.recent or not publications or size <= 0:
            return
        last = publications[-1]
        if (last.offset, last.epoch) == (self.offset, self.epoch):
            self.recent = deque(publications[-size:], maxlen=size)

    def settle(self) -> None:
        """A join ended (joined or failed): wake the subscribers waiting for it."""
        settled, self.settled = self.settled, None
        if settled is not None:
            settled.set()
