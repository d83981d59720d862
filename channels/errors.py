"""What the hub refuses, with the wire error code the transports answer with."""

from __future__ import annotations


class SubscribeError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
