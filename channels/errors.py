"""What the hub refuses, with the wire error code the transports answer with."""

from __future__ import annotations

from collections.abc import Collection


class SubscribeError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def check_room(held: Collection[str], channel: str, most: int) -> None:
    """Whether a connection holding ``held`` may subscribe to ``channel`` (``most``: its
    limit): the hub's first check, which a caller that asks the backend first (the
    subscribe hook) makes before the backend is asked of a channel it would refuse."""
    if channel in held:
        raise SubscribeError("bad_request", f"already subscribed to {channel}")
    if len(held) >= most:
        raise SubscribeError("limit_exceeded", "too many channels on one connection")
