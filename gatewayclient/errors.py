"""The client's one exception type, carrying the contract's error codes."""

from __future__ import annotations

from typing import Any

# The gateway's codes (the contract) and the client's own.
DISCONNECTED = "disconnected"  # the connection dropped before the reply came
TIMEOUT = "timeout"  # no reply, or no connection, within the command timeout
CLOSED = "closed"  # the client was closed


class GatewayError(Exception):
    """An error reply (``code`` is the contract's: ``forbidden``, ``not_found``, …), an HTTP
    error of the API (``status`` and ``details``, its body, set), or one of the client's
    own codes: ``disconnected`` (the command may or may not have run: retry a publish
    only if a duplicate is acceptable), ``timeout``, ``closed``."""

    def __init__(
        self,
        code: str,
        message: str = "",
        *,
        status: int | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message
        self.status = status
        self.details = details or {}  # the HTTP error body (a streamed publish: published…)
