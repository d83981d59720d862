"""The HTTP API for backends: publish, broadcast, history, presence.

Bodies are read and decoded with orjson directly (no pydantic model on the hot
path), with the size checked while reading so a huge body is refused with 413
without being held in memory.
"""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Query, Request

from auth import Claims
from channels.broker import BrokerUnavailable
from channels.hub import SubscribeError
from channels.names import is_valid_channel
from gateway.deps import ClaimsDep, GatewayDep
from gateway.errors import ErrorCode, GatewayError, JSONBody
from gateway.ratelimit import RateLimiter
from gateway.runtime import Gateway

router = APIRouter(prefix="/api", default_response_class=JSONBody)
MAX_BROADCAST_CHANNELS = 1000


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


async def json_object(request: Request, gateway: Gateway) -> dict[str, Any]:
    body = await read_body(request, gateway.settings.max_message_bytes)
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise GatewayError(ErrorCode.BAD_REQUEST, "body is not valid JSON") from None
    if not isinstance(value, dict):
        raise GatewayError(ErrorCode.BAD_REQUEST, "body must be a JSON object")
    return value


def checked_channel(value: Any) -> str:
    if not isinstance(value, str):
        raise GatewayError(ErrorCode.BAD_REQUEST, "'channel' must be a string")
    if not is_valid_channel(value):
        raise GatewayError(ErrorCode.BAD_REQUEST, f"invalid channel name {value[:140]!r}")
    return value


def require(allowed: bool, action: str, channel: str) -> None:
    if not allowed:
        raise GatewayError(ErrorCode.FORBIDDEN, f"token does not allow {action} {channel}")


class ApiRateLimit:
    """Per-user token buckets for publishing through the API (off when the rate is 0)."""

    def __init__(self) -> None:
        self._buckets: dict[str, RateLimiter] = {}

    def __call__(self, request: Request, claims: ClaimsDep) -> Claims:
        gateway: Gateway = request.app.state.gateway
        rate = gateway.settings.api_publish_rate
        if rate:
            if len(self._buckets) > 100_000:
                self._buckets.clear()
            bucket = self._buckets.setdefault(claims.user, RateLimiter(rate))
            if not bucket.allow():
                raise GatewayError(ErrorCode.RATE_LIMITED, "publishing too fast")
        return claims


PublisherDep = Annotated[Claims, Depends(ApiRateLimit())]


def unavailable() -> GatewayError:
    return GatewayError(ErrorCode.UNAVAILABLE, "broker unavailable")


@router.post("/publish")
async def publish(request: Request, gateway: GatewayDep, claims: PublisherDep) -> JSONBody:
    body = await json_object(request, gateway)
    channel = checked_channel(body.get("channel"))
    if "data" not in body:
        raise GatewayError(ErrorCode.BAD_REQUEST, "'data' is required")
    require(claims.can_publish(channel), "publishing to", channel)
    try:
        publication = await gateway.hub.publish(channel, orjson.dumps(body["data"]))
    except BrokerUnavailable:
        raise unavailable() from None
    return JSONBody({"offset": publication.offset, "epoch": publication.epoch})


@router.post("/broadcast")
async def broadcast(request: Request, gateway: GatewayDep, claims: PublisherDep) -> JSONBody:
    body = await json_object(request, gateway)
    channels = body.get("channels")
    if not isinstance(channels, list) or not channels:
        raise GatewayError(ErrorCode.BAD_REQUEST, "'channels' must be a non-empty list")
    if len(channels) > MAX_BROADCAST_CHANNELS:
        raise GatewayError(ErrorCode.LIMIT_EXCEEDED, f"at most {MAX_BROADCAST_CHANNELS} channels")
    if "data" not in body:
        raise GatewayError(ErrorCode.BAD_REQUEST, "'data' is required")
    names = [checked_channel(channel) for channel in channels]
    for channel in names:  # every check before anything is published
        require(claims.can_publish(channel), "publishing to", channel)
    data = orjson.dumps(body["data"])
    results = []
    try:
        for channel in names:
            publication = await gateway.hub.publish(channel, data)
            results.append(
                {"channel": channel, "offset": publication.offset, "epoch": publication.epoch}
            )
    except BrokerUnavailable:
        raise unavailable() from None
    return JSONBody({"results": results})


@router.get("/channels/{channel}/history")
async def history(
    channel: str,
    gateway: GatewayDep,
    claims: ClaimsDep,
    since_offset: Annotated[int | None, Query(ge=0)] = None,
    limit: Annotated[int | None, Query(ge=0)] = None,
) -> JSONBody:
    checked_channel(channel)
    require(claims.can_subscribe(channel), "reading history of", channel)
    try:
        if since_offset is None:
            page = await gateway.hub.history(channel, limit=limit)
        else:  # what history still holds after since_offset, oldest first
            page = await gateway.hub.history(channel)
            after = [pub for pub in page.publications if pub.offset > since_offset]
            page.publications = after if limit is None else after[:limit]
    except BrokerUnavailable:
        raise unavailable() from None
    return JSONBody(
        {
            "publications": [pub.history_entry() for pub in page.publications],
            "offset": page.position.offset,
            "epoch": page.position.epoch,
        }
    )


@router.get("/channels/{channel}/presence")
async def presence(channel: str, gateway: GatewayDep, claims: ClaimsDep) -> JSONBody:
    checked_channel(channel)
    require(claims.can_subscribe(channel), "reading presence of", channel)
    try:
        entries = await gateway.hub.presence(channel)
    except SubscribeError as exc:
        raise GatewayError(ErrorCode(exc.code), str(exc)) from None
    except BrokerUnavailable:
        raise unavailable() from None
    return JSONBody({"clients": [orjson.Fragment(entry) for entry in entries]})
