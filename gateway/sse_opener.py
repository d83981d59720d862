"""``GET /sse`` opened below ASGI by the gateway's own HTTP protocol (``OPEN_STREAM``),
when every check of the endpoint passes; ``passing`` is those checks, which
``gateway.sse_open.Shortcut`` (in front of the app, under any other server) asks too.

Compiled (setup.py): the opener runs in the callback that parsed the request. What it
declines goes on to the framework's route (``gateway.sse``), which answers it, errors
included (tests/test_sse_shortcut.py).
"""

from __future__ import annotations

import functools

from auth import AuthError, Claims
from channels.hub import SubscribeError
from channels.publication import StreamPosition
from gateway.cors import CorsHeaders
from gateway.errors import GatewayError, JSONBody, refusal_name
from gateway.query import hooked, last_of, query_params, token_of
from gateway.runtime import Gateway
from gateway.server.ports import OpenLater, RequestHead, Respond, Started, StreamOpener, StreamPort
from gateway.sse import (
    RAW_HEADERS,
    Stream,
    checked_request,
    gateway_error_of,
    on_ready_for,
    open_stream,
    subscribe_channels,
)

Checked = tuple[Claims, list[str], dict[str, StreamPosition]]


def passing(
    gateway: Gateway,
    query: bytes,
    authorization: str | None,
    last_event_id: str | None,
    origin: str | None,
) -> Checked | None:
    """The claims, channels and positions of a ``GET /sse`` that passes every check of the
    endpoint and needs no connect hook; None for anything else (the endpoint answers it)."""
    if origin is not None and not gateway.origin_allowed(origin):
        return None
    try:
        params = query_params(query)  # once, for the three it reads
        claims = gateway.verifier.verify(token_of(last_of(params, "token"), authorization))
        requested = params.get("channel", [])
        last_event_id = last_event_id or last_of(params, "last_event_id")
        channels, positions = checked_request(gateway, claims, requested, last_event_id)
    except (AuthError, GatewayError):
        return None
    if hooked(gateway, claims):
        return None  # the connect hook is a wait: the endpoint calls it
    return claims, channels, positions


def opener(gateway: Gateway, cors: CorsHeaders) -> StreamOpener:
    """``GET /sse`` opened below ASGI by the gateway's own HTTP protocol (``OPEN_STREAM``).

    The checks are ``Shortcut``'s (the endpoint's, on the request's head); a stream whose
    channels the worker already relays is subscribed at once (``Hub.subscribe_now``), so
    the response starts in the very callback that parsed the request, with no task; the
    others open once their subscribes are done (``OpenLater``). The head carries the
    app's CORS headers (``CorsHeaders``), as the framework's route would; a subscribe
    that fails is answered with the route's error. What this declines, the app answers.
    """

    def open_sse(request: RequestHead) -> Started | OpenLater | None:
        if request.path != "/sse":
            return None
        authorization, last_event_id, origin = (
            request.header("authorization"),
            request.header("last-event-id"),
            request.header("origin"),
        )
        checked = passing(gateway, request.query_string, authorization, last_event_id, origin)
        if checked is None:
            return None
        claims, channels, positions = checked
        for channel in channels:
            if gateway.subscribe_hooked and gateway.hooks.applies("subscribe", channel):
                return OpenLater(lambda: _open_later(gateway, cors, origin, checked))
        stream = Stream(gateway, claims, channels)
        gateway.opened(stream.session)
        hub = gateway.hub
        for n, channel in enumerate(channels):
            since = positions.get(channel)
            ready = on_ready_for(stream, channel, since)
            try:
                joined = hub.subscribe_now(stream.session, channel, since, ready)
            except SubscribeError as exc:
                return OpenLater(functools.partial(_refused, stream, cors, origin, exc))
            if joined is None:  # a broker call first: the rest after it
                rest = channels[n:]
                return OpenLater(
                    functools.partial(_subscribe_rest, stream, cors, origin, rest, positions)
                )
        return Opened(stream, cors.headers(RAW_HEADERS, origin))

    return open_sse


class Opened:
    """A subscribed stream, ready for its response (``gateway.server.ports.Started``)."""

    def __init__(self, stream: Stream, headers: list[tuple[bytes, bytes]]) -> None:
        self.stream = stream
        self.headers = headers
        self.opening = stream.opening()

    def start(self, port: StreamPort) -> None:
        self.stream.start(port)

    async def abandon(self) -> None:
        await self.stream.abandon()


async def _open_later(
    gateway: Gateway, cors: CorsHeaders, origin: str | None, checked: Checked
) -> Opened | Respond:
    try:
        stream = await open_stream(gateway, *checked)
    except GatewayError as exc:
        return _respond(gateway, cors, origin, exc)
    return Opened(stream, cors.headers(RAW_HEADERS, origin))


async def _subscribe_rest(
    stream: Stream,
    cors: CorsHeaders,
    origin: str | None,
    channels: list[str],
    positions: dict[str, StreamPosition],
) -> Opened | Respond:
    try:
        await subscribe_channels(stream, channels, positions)
    except BaseException as exc:
        return await _refused(stream, cors, origin, exc)
    return Opened(stream, cors.headers(RAW_HEADERS, origin))


async def _refused(
    stream: Stream, cors: CorsHeaders, origin: str | None, exc: BaseException
) -> Respond:
    await stream.abandon()
    error = gateway_error_of(exc)
    if not isinstance(error, GatewayError):
        raise error
    return _respond(stream.gateway, cors, origin, error)


def _respond(
    gateway: Gateway, cors: CorsHeaders, origin: str | None, error: GatewayError
) -> Respond:
    """The route's answer to ``error`` (``JSONBody``, through the CORS middleware),
    counted as a stream refused."""
    gateway.connections.refuse("sse", refusal_name(error))
    body = JSONBody(error.body(), status_code=error.status)
    return Respond(error.status, cors.headers(list(body.raw_headers), origin), bytes(body.body))
