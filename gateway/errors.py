"""Error codes and close codes of the wire contract, as named tables."""

from __future__ import annotations

from enum import StrEnum
from typing import Any, NamedTuple

import orjson
from starlette.responses import Response

from channels.session import Ending


class ErrorCode(StrEnum):
    BAD_REQUEST = "bad_request"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    TOO_LARGE = "too_large"
    RATE_LIMITED = "rate_limited"
    LIMIT_EXCEEDED = "limit_exceeded"
    INTERNAL = "internal"


HTTP_STATUS = {
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.LIMIT_EXCEEDED: 400,
    ErrorCode.INTERNAL: 500,
}


class GatewayError(Exception):
    """An error a client sees: a WebSocket error reply or an HTTP error body."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = HTTP_STATUS[code] if status is None else status
        self.headers = headers  # of an HTTP answer (a 429's Retry-After)

    @classmethod
    def unavailable(cls, message: str = "broker unavailable") -> GatewayError:
        """HTTP 503, for a while: the broker cannot be reached, or this worker drains or
        is full. Its code is the contract's ``internal`` (its codes are a closed list)."""
        return cls(ErrorCode.INTERNAL, message, 503)

    def body(self) -> dict[str, dict[str, str]]:
        return {"error": {"code": str(self.code), "message": self.message}}


MAX_CLOSE_REASON = 123  # bytes: a close frame's payload is at most 125, the code 2 of them


class Close(NamedTuple):
    code: int
    reason: str


class CloseCode:
    UNAUTHORIZED = Close(4001, "unauthorized")
    TOKEN_EXPIRED = Close(4001, "token expired")
    BAD_REQUEST = Close(4002, "bad request")
    SLOW_CONSUMER = Close(4008, "slow consumer")
    # Publications of a channel were lost for good on their way to this worker (it was
    # cut off from the broker longer than history covers): reconnect and resubscribe
    # from your positions, to be told ``recovered: false`` (Centrifugo's 3010).
    INSUFFICIENT_STATE = Close(4009, "insufficient state")
    ORIGIN_NOT_ALLOWED = Close(1008, "origin not allowed")
    MESSAGE_TOO_BIG = Close(1009, "message too big")
    SERVICE_RESTART = Close(1012, "service restart")
    TRY_AGAIN_LATER = Close(1013, "try again later")
    INTERNAL_ERROR = Close(1011, "internal error")
    CONNECT_HOOK_FAILED = Close(1011, "connect hook failed")
    REFUSED = Close(4003, "forbidden")  # by the connect hook; its message is the reason
    NORMAL = Close(1000, "")


# A refused connection's reason in the metrics (gateway_connections_refused_total).
_REFUSAL_NAMES = {
    1008: "origin_not_allowed",
    1011: "connect_hook_failed",
    1012: "service_restart",
    1013: "try_again_later",
    4001: "unauthorized",
    4003: "refused_by_hook",
}


def refusal_name(refusal: Close | GatewayError) -> str:
    """How a refused WebSocket (its close) or SSE request (its error) is counted."""
    if isinstance(refusal, Close):
        return _REFUSAL_NAMES.get(refusal.code, f"close_{refusal.code}")
    return "unavailable" if refusal.status == 503 else str(refusal.code)


def close_for(reason: object) -> Close | None:
    """The close frame for why a session ended; None when the client is already gone."""
    if reason is Ending.CLIENT_GONE:
        return None
    if reason is Ending.SLOW_CONSUMER:
        return CloseCode.SLOW_CONSUMER
    return reason if isinstance(reason, Close) else CloseCode.NORMAL


class JSONBody(Response):
    """A JSON response encoded with orjson (``orjson.Fragment`` passes pre-encoded JSON through)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)
