"""The checks every entry point makes before touching a channel: its name, then the token.

WebSocket commands, ``/sse`` and the HTTP API share them, so a channel is refused
with the same code and message whichever way it is asked for.
"""

from __future__ import annotations

from channels.names import is_valid_channel
from gateway.errors import ErrorCode, GatewayError


def checked_channel(value: object) -> str:
    """``value`` if it is a valid channel name, else ``bad_request``."""
    if not isinstance(value, str):
        raise GatewayError(ErrorCode.BAD_REQUEST, "'channel' must be a string")
    if not is_valid_channel(value):
        raise GatewayError(ErrorCode.BAD_REQUEST, f"invalid channel name {value[:140]!r}")
    return value


def require(allowed: bool, action: str, channel: str) -> None:
    """``forbidden`` unless the token's claims allow ``action`` on ``channel``."""
    if not allowed:
        raise GatewayError(ErrorCode.FORBIDDEN, f"token does not allow {action} {channel}")
