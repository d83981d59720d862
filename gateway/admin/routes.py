"""The admin routes and who may use them (``gateway.admin`` says who)."""

from __future__ import annotations

import hmac
from importlib import resources
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse
from starlette.exceptions import HTTPException

from channels.broker import BrokerUnavailable
from channels.hub import SubscribeError
from gateway import wire
from gateway.access import checked_channel
from gateway.admin.stats import ClusterStats
from gateway.bodies import json_object
from gateway.deps import GatewayDep
from gateway.dev_guard import PAGE_HEADERS, dev_request, json_request
from gateway.errors import ErrorCode, GatewayError, JSONBody
from gateway.paths import CHANNEL

PAGE = resources.files("gateway") / "static" / "admin.html"


async def admin_enabled(gateway: GatewayDep) -> None:
    """404, as for any unknown path, when the admin view is off."""
    if not gateway.settings.admin_token and gateway.dev_secret is None:
        raise HTTPException(404, "Not Found")


async def admin_only(request: Request, gateway: GatewayDep) -> None:
    """The admin token as a bearer token, when one is set (compared in constant time);
    in dev mode without one, a request at a local host (``gateway.dev_guard``)."""
    expected = gateway.settings.admin_token
    if not expected:
        await dev_request(request, gateway)
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode(), expected.encode()
    ):
        raise GatewayError(ErrorCode.UNAUTHORIZED, "the admin token is required")


router = APIRouter(include_in_schema=False, dependencies=[Depends(admin_enabled)])
api = APIRouter(
    prefix="/admin/api", default_response_class=JSONBody, dependencies=[Depends(admin_only)]
)


@router.get("/admin")
async def page() -> HTMLResponse:
    """The page holds no figures: it fetches them from the API with the token."""
    headers = {"Cache-Control": "no-cache", **PAGE_HEADERS}
    return HTMLResponse(PAGE.read_text(encoding="utf-8"), headers=headers)


@api.get("/stats")
async def stats(request: Request, gateway: GatewayDep) -> JSONBody:
    cluster: ClusterStats = request.app.state.admin_stats
    body = await cluster.cluster()
    body["dev_mode"] = gateway.dev_secret is not None
    return JSONBody(body)


@api.post("/publish", dependencies=[Depends(json_request)])
async def publish(request: Request, gateway: GatewayDep) -> JSONBody:
    body = await json_object(request, gateway.settings.max_message_bytes)
    channel = checked_channel(body.get("channel"))
    if "data" not in body:
        raise GatewayError(ErrorCode.BAD_REQUEST, "'data' is required")
    try:
        publication = await gateway.hub.publish(channel, orjson.dumps(body["data"]))
    except BrokerUnavailable:
        raise GatewayError.unavailable() from None
    return JSONBody({"offset": publication.offset, "epoch": publication.epoch})


@api.get(f"/channels/{{channel:{CHANNEL}}}/history")
async def history(
    channel: str, gateway: GatewayDep, limit: Annotated[int, Query(ge=1, le=1000)] = 20
) -> JSONBody:
    checked_channel(channel)
    try:
        page = await gateway.hub.history(channel, limit=limit)
    except BrokerUnavailable:
        raise GatewayError.unavailable() from None
    return JSONBody(wire.history_body(page))


@api.get(f"/channels/{{channel:{CHANNEL}}}/presence")
async def presence(channel: str, gateway: GatewayDep) -> JSONBody:
    checked_channel(channel)
    subscribers = gateway.hub.local_subscribers(channel)
    clients: list[Any] = []
    try:
        clients = [orjson.Fragment(entry) for entry in await gateway.hub.presence(channel)]
    except SubscribeError:  # no presence on this channel (GATEWAY_PRESENCE_CHANNELS)
        return JSONBody({"presence": False, "clients": [], "local_subscribers": subscribers})
    except BrokerUnavailable:
        raise GatewayError.unavailable() from None
    return JSONBody({"presence": True, "clients": clients, "local_subscribers": subscribers})


router.include_router(api)
