"""Request bodies of the HTTP API: read with a size cap, decoded with orjson.

No pydantic model on the publish path; the size is checked while reading, so a
huge body is refused with 413 without being held in memory.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

import orjson
from starlette.requests import Request

from gateway.errors import ErrorCode, GatewayError
from gateway.runtime import Gateway


class Draining(Exception):
    """The server's shutdown deadline is near: the body is not read any further."""


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


class _BodyReader:
    """One request's entry in ``Gateway.body_readers``: called, it stops the reading."""

    __slots__ = ("reading", "stopped", "task")

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.task, self.reading, self.stopped = task, False, False

    def asked(self) -> bool:
        return self.stopped

    def __call__(self) -> None:
        self.stopped = True
        if self.reading:  # waiting for the next chunk: cut short
            self.task.cancel("the gateway is shutting down")


async def chunks_until_drained(request: Request, gateway: Gateway) -> AsyncGenerator[bytes, None]:
    """``request.stream()``'s chunks, until the gateway's drain asks body readers to stop
    (``Gateway.body_readers``, a second before the server cuts what still runs, with no
    answer): then ``Draining``, so that the caller answers with what it did. A wait for
    the next chunk is cut short; a chunk being handled is handled first."""
    task = asyncio.current_task()
    assert task is not None
    reader = _BodyReader(task)
    gateway.body_readers.add(reader)
    try:
        chunks = request.stream()
        while not reader.stopped:
            reader.reading = True
            try:
                chunk = await anext(chunks)
            except StopAsyncIteration:
                return
            except asyncio.CancelledError:
                # (read again after the wait: ``stop`` may have run meanwhile)
                if reader.asked() and task.uncancel() == 0:  # ours, no one else's as well
                    raise Draining from None
                raise
            finally:
                reader.reading = False
            yield chunk
        raise Draining
    finally:
        gateway.body_readers.discard(reader)
