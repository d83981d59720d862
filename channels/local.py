"""A channel as one worker's hub holds it: its sessions, by how far they are."""

from __future__ import annotations

from dataclasses import dataclass, field

from channels.publication import Message, StreamPosition
from channels.session import Session


@dataclass(slots=True)
class Join:
    """A session whose subscribe is in flight: what arrives live meanwhile."""

    buffer: list[Message] = field(default_factory=list)


class LocalChannel:
    __slots__ = (
        "catching_up",
        "epoch",
        "joining",
        "live",
        "name",
        "offset",
        "pending",
        "recovering",
        "upstream",
    )

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

    def __len__(self) -> int:
        return len(self.live) + len(self.joining) + len(self.catching_up)

    @property
    def position(self) -> StreamPosition:
        """The last publication this worker received of the channel (epoch set)."""
        assert self.epoch is not None
        return StreamPosition(self.offset, self.epoch)

    def remove(self, session: Session) -> bool:
        if session in self.live:
            del self.live[session]
            return True
        return (
            self.joining.pop(session, None) is not None
            or self.catching_up.pop(session, None) is not None
        )
