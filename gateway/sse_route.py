"""``GET /sse`` as a FastAPI route: what a request the openers decline gets (errors, the
connect hook's wait), and every stream under uvicorn's stock protocols or another
server. The stream itself is ``gateway.sse``'s, which is compiled (setup.py): FastAPI
reads this endpoint's signature, and ``EventStream`` derives from starlette's
``Response``, neither of which a compiled module can hold.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from auth import AuthError, Claims
from channels.session import Ending, new_client_id
from gateway.access import checked_channel
from gateway.deps import GatewayDep, MaybeClaimsDep
from gateway.errors import ErrorCode, GatewayError, refusal_name
from gateway.hooks import Opening
from gateway.query import hooked
from gateway.runtime import Gateway
from gateway.server.ports import stream_port
from gateway.sse import RAW_HEADERS, Stream, checked_request, open_stream, positions_from

router = APIRouter()


class EventStream(Response):
    """The streaming response: the opening, then the stream on the response's port."""

    def __init__(self, stream: Stream) -> None:
        super().__init__(status_code=200)
        self.raw_headers = list(RAW_HEADERS)  # no content-length: the body is a stream
        self.stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stream = self.stream
        settings = stream.gateway.settings
        opening = stream.opening()
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            await send({"type": "http.response.body", "body": opening, "more_body": True})
        except BaseException:
            await stream.abandon()
            raise
        port = stream_port(scope, receive, send, raw=settings.raw_writes)
        stream.start(port)
        try:
            await port.hold()  # the gateway's protocol: at once, and the stream lives on
        except BaseException:  # the server cancelled the call: end the stream
            stream.session.close(Ending.CLIENT_GONE)
            raise


@router.get("/sse", response_class=Response)
async def sse_endpoint(request: Request, gateway: GatewayDep, claims: MaybeClaimsDep) -> Any:
    try:
        return await _open(request, gateway, claims)
    except GatewayError as exc:  # answered by the app's handler; counted here
        gateway.connections.refuse("sse", refusal_name(exc))
        raise


async def _open(request: Request, gateway: Gateway, claims: Claims | AuthError) -> EventStream:
    if not gateway.origin_allowed(request.headers.get("origin")):
        # As a WebSocket's 1008, before anything else: a page of another origin could
        # not read the stream, but it would be subscribed (and join presence) all the same.
        raise GatewayError(ErrorCode.FORBIDDEN, "origin not allowed")
    last_event_id = request.headers.get("last-event-id") or request.query_params.get(
        "last_event_id"
    )
    requested = request.query_params.getlist("channel")
    if not hooked(gateway, claims):
        if isinstance(claims, AuthError):
            raise GatewayError(ErrorCode.UNAUTHORIZED, str(claims))
        channels, positions = checked_request(gateway, claims, requested, last_event_id)
        return EventStream(await open_stream(gateway, claims, channels, positions))
    # The connect hook decides. Without a token it is the authentication, which comes
    # first as the token's check does; with one, a bad request is refused without it.
    if gateway.draining or gateway.connections.at_capacity:
        raise GatewayError.unavailable("gateway is draining or full, retry elsewhere")
    if isinstance(claims, Claims):
        for channel in requested:
            checked_channel(channel)
        positions_from(last_event_id)
    client_id = new_client_id()
    token_claims = None if isinstance(claims, AuthError) else claims
    opening = Opening("sse", client_id, request.cookies, request.headers, requested)
    grant = await gateway.hooks.connect(token_claims, opening)
    claims = grant.apply(token_claims)
    deadline = gateway.verifier.deadline(claims)
    if deadline is not None and deadline <= time.time():  # (a WebSocket is closed 4001)
        raise GatewayError(ErrorCode.UNAUTHORIZED, "token expired")  # no stream to end at once
    channels, positions = checked_request(gateway, claims, requested, last_event_id, grant.channels)
    stream = await open_stream(gateway, claims, channels, positions, client_id, grant.channels)
    return EventStream(stream)
