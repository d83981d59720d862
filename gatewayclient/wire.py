"""The contract's close codes and URLs, as the WebSocket client uses them."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from gatewayclient.errors import GatewayError

# Close codes of the contract that change how the client reconnects.
SERVICE_RESTART = 1012
TRY_AGAIN_LATER = 1013
UNAUTHORIZED = 4001
SLOW_CONSUMER = 4008
INSUFFICIENT_STATE = 4009  # publications lost on their way to the worker: resubscribe
QUICK_RECONNECT = 1.0  # after 1012 / 4008 / 4009: within a second, to a worker or the same


def websocket_url(base: str, token: str) -> str:
    """``base`` (``http(s)://`` or ``ws(s)://``, maybe with a path prefix) + ``/ws?token=``."""
    parts = urlsplit(base)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    path = parts.path.rstrip("/") + "/ws"
    return urlunsplit((scheme, parts.netloc, path, f"token={quote(token, safe='')}", ""))


def error_of(reply: dict[str, Any]) -> GatewayError:
    error = reply.get("error")
    if not isinstance(error, dict):
        error = {}
    return GatewayError(str(error.get("code", "internal")), str(error.get("message", "")))
