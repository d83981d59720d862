"""The HTTP API for backends: publish, broadcast, history, presence (bodies: ``gateway.bodies``)."""

from __future__ import annotations

import asyncio
from typing import Annotated

import orjson
from fastapi import APIRouter, Query, Request

from channels.broker import BrokerUnavailable
from channels.hub import SubscribeError
from channels.publication import MAX_OFFSET, offset_from_text
from gateway import wire
from gateway.access import checked_channel, require
from gateway.bodies import encoded, idempotency_key, json_object
from gateway.deps import ClaimsDep, GatewayDep, PublisherDep
from gateway.errors import ErrorCode, GatewayError, JSONBody
from gateway.paths import CHANNEL

router = APIRouter(prefix="/api", default_response_class=JSONBody)


@router.post("/publish")
async def publish(request: Request, gateway: GatewayDep, claims: PublisherDep) -> JSONBody:
    body = await json_object(request, gateway.settings.max_message_bytes)
    channel = checked_channel(body.get("channel"))
    if "data" not in body:
        raise GatewayError(ErrorCode.BAD_REQUEST, "'data' is required")
    require(claims.can_publish(channel), "publishing to", channel)
    once = idempotency_key(body)
    try:
        publication = await gateway.hub.publish(channel, encoded(body["data"]), once)
    except BrokerUnavailable:
        raise GatewayError.unavailable() from None
    return JSONBody({"offset": publication.offset, "epoch": publication.epoch})


@router.post("/broadcast")
async def broadcast(request: Request, gateway: GatewayDep, claims: PublisherDep) -> JSONBody:
    body = await json_object(request, gateway.settings.max_message_bytes)
    channels = body.get("channels")
    if not isinstance(channels, list) or not channels:
        raise GatewayError(ErrorCode.BAD_REQUEST, "'channels' must be a non-empty list")
    most = gateway.settings.max_broadcast_channels
    if len(channels) > most:
        raise GatewayError(ErrorCode.LIMIT_EXCEEDED, f"at most {most} channels")
    if "data" not in body:
        raise GatewayError(ErrorCode.BAD_REQUEST, "'data' is required")
    names = [checked_channel(channel) for channel in channels]
    for channel in names:  # every check before anything is published
        require(claims.can_publish(channel), "publishing to", channel)
    data = encoded(body["data"])
    once = idempotency_key(body)
    try:
        if once is None:  # one round trip per Redis server, not one per channel
            publications = await gateway.hub.publish_each(names, data)
        else:  # each channel's key checked where the channel is: a call each, at once
            calls = [gateway.hub.publish(name, data, once) for name in names]
            publications = list(await asyncio.gather(*calls))
    except BrokerUnavailable:
        raise GatewayError.unavailable() from None
    results = [{"channel": p.channel, "offset": p.offset, "epoch": p.epoch} for p in publications]
    return JSONBody({"results": results})


@router.get(f"/channels/{{channel:{CHANNEL}}}/history")
async def history(
    channel: str,
    gateway: GatewayDep,
    claims: ClaimsDep,
    since_offset: Annotated[str | None, Query()] = None,
    limit: Annotated[str | None, Query()] = None,
) -> JSONBody:
    since, count = _whole_number("since_offset", since_offset), _whole_number("limit", limit)
    checked_channel(channel)
    require(claims.can_subscribe(channel), "reading history of", channel)
    try:
        if since is None:
            page = await gateway.hub.history(channel, limit=count)
        else:  # what history still holds after since_offset, oldest first
            page = await gateway.hub.history(channel)
            after = [pub for pub in page.publications if pub.offset > since]
            page.publications = after if count is None else after[:count]
    except BrokerUnavailable:
        raise GatewayError.unavailable() from None
    return JSONBody(wire.history_body(page))


def _whole_number(name: str, value: str | None) -> int | None:
    """A query parameter as the WebSocket's ``since`` and a stream's cursor take an
    offset: decimal digits, 0 to 2^63-1 (not pydantic's lax "+1", " 1" or "1_0")."""
    if value is None:
        return None
    number = offset_from_text(value)
    if number is None:
        raise GatewayError(
            ErrorCode.BAD_REQUEST, f"{name}: a whole number from 0 to {MAX_OFFSET} expected"
        )
    return number


@router.get(f"/channels/{{channel:{CHANNEL}}}/presence")
async def presence(channel: str, gateway: GatewayDep, claims: ClaimsDep) -> JSONBody:
    checked_channel(channel)
    require(claims.can_subscribe(channel), "reading presence of", channel)
    try:
        entries = await gateway.hub.presence(channel)
    except SubscribeError as exc:
        raise GatewayError(ErrorCode(exc.code), str(exc)) from None
    except BrokerUnavailable:
        raise GatewayError.unavailable() from None
    return JSONBody({"clients": [orjson.Fragment(entry) for entry in entries]})
