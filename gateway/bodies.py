"""Request bodies of the HTTP API: read with a size cap, decoded with orjson.

No pydantic model on the publish path; the size is checked while reading, so a
huge body is refused with 413 without being held in memory.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request

from gateway.errors import ErrorCode, GatewayError


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise GatewayError(ErrorCode.TOO_LARGE, f"body over {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise GatewayError(ErrorCode.TOO_LARGE, f"body over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def json_object(request: Request, limit: int) -> dict[str, Any]:
    """The body, a JSON object of at most ``limit`` bytes."""
    body = await read_body(request, limit)
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise GatewayError(ErrorCode.BAD_REQUEST, "body is not valid JSON") from None
    if not isinstance(value, dict):
        raise GatewayError(ErrorCode.BAD_REQUEST, "body must be a JSON object")
    return value


def encoded(data: Any, what: str = "'data'") -> bytes:
    """A request's ``data`` as JSON again (orjson reads 1,024 levels of nesting, writes
    254): a 400 past that, not a 500."""
    try:
        return orjson.dumps(data)
    except orjson.JSONEncodeError:
        raise GatewayError(ErrorCode.BAD_REQUEST, f"{what} is nested too deeply") from None


MAX_IDEMPOTENCY_KEY = 128  # characters


def idempotency_key(body: dict[str, Any]) -> str | None:
    """The body's ``idempotency_key``: absent (or null) is None, else a string of 1 to
    ``MAX_IDEMPOTENCY_KEY`` characters."""
    key = body.get("idempotency_key")
    if key is None:
        return None
    if not isinstance(key, str) or not 0 < len(key) <= MAX_IDEMPOTENCY_KEY:
        raise GatewayError(
            ErrorCode.BAD_REQUEST,
            f"'idempotency_key' must be a string of 1 to {MAX_IDEMPOTENCY_KEY} characters",
        )
    return key
