"""The WebSocket commands: one function per ``op``, each answering with a reply or an error.

``handle`` runs a parsed command (``gateway.commands``) for one client and pushes
its reply; every error becomes an error reply with the contract's code, never a
closed connection. A subscribe's reply goes out from inside the hub's join
(``on_ready``), ahead of the channel's first publication.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final, Protocol

import orjson

from auth import AuthError, Claims
from channels.broker import BrokerUnavailable
from channels.errors import check_room
from channels.hub import SubscribeError, SubscribeResult
from channels.session import Session
from gateway import wire
from gateway.access import require
from gateway.commands import Command
from gateway.errors import ErrorCode, GatewayError
from gateway.hooks import NO_INFO
from gateway.ratelimit import RateLimiter
from gateway.runtime import Gateway

logger = logging.getLogger(__name__)


class Client(Protocol):
    """What the commands need of a connection (``gateway.ws.Connection``)."""

    gateway: Gateway
    session: Session
    claims: Claims
    publish_limiter: RateLimiter | None  # made by the first publish or RPC (``_allowed``)

    def refresh(self, claims: Claims) -> None: ...


Op = Callable[[Client, Command], Awaitable[dict[str, Any] | None]]


async def handle(client: Client, command: Command) -> None:
    """Run ``command`` and push its reply (unless the op queued it itself)."""
    try:
        result = await OPS[command.op](client, command)
    except Exception as exc:
        _failed(client.session, command, exc)
    else:
        if result is not None:
            client.session.push(wire.reply(command.id, result))


def handle_now(client: Client, command: Command) -> bool:
    """``handle`` without a wait, for a command that needs none (``NOW``): a ``ping``, a
    subscribe to a channel the worker already relays, an unsubscribe that others stay
    on. False, with nothing done, when ``handle`` must be awaited: the connection then
    needs a task only for the commands that wait on the broker."""
    op = NOW.get(command.op)
    if op is None:
        return False
    try:
        return op(client, command)
    except Exception as exc:
        _failed(client.session, command, exc)
        return True


def _failed(session: Session, command: Command, exc: Exception) -> None:
    """The error reply for what a command raised."""
    if isinstance(exc, GatewayError):
        session.push(wire.error_reply(command.id, exc.code, exc.message))
    elif isinstance(exc, SubscribeError):
        session.push(wire.error_reply(command.id, exc.code, str(exc)))
    elif isinstance(exc, BrokerUnavailable):
        message = "broker unavailable, retry later"
        session.push(wire.error_reply(command.id, ErrorCode.INTERNAL, message))
    else:
        logger.error("op %s failed", command.op, exc_info=exc)
        session.push(wire.error_reply(command.id, ErrorCode.INTERNAL, "internal error"))


def _subscribe_reply(
    session: Session, command: Command, info: Any = NO_INFO
) -> Callable[[SubscribeResult], None]:
    def reply(result: SubscribeResult) -> None:
        position = result.position
        body = {"offset": position.offset, "epoch": position.epoch, "recovered": result.recovered}
        if info is not NO_INFO:  # what the subscribe hook attached
            body["info"] = info
        session.push(wire.reply(command.id, body))

    return reply


def _may_subscribe(client: Client, channel: str) -> None:
    """The token's permission; a channel the connection holds already (a connect hook's
    server-side one, which no pattern need cover) is the hub's ``already subscribed``."""
    if channel not in client.session.channels:
        require(client.claims.can_subscribe(channel), "subscribing to", channel)


async def subscribe(client: Client, command: Command) -> None:
    channel = command.channel
    _may_subscribe(client, channel)
    session = client.session
    info: Any = NO_INFO  # held already: the hub's "already subscribed", no backend asked
    if channel not in session.channels:
        # One the hub would refuse (the connection's channel limit) is not put to the backend.
        gateway = client.gateway
        check_room(session.channels, channel, gateway.hub.max_channels_per_session)
        if gateway.hooks.applies("subscribe", channel) and not _allowed(client):
            raise GatewayError(ErrorCode.RATE_LIMITED, "subscribing too fast")  # as an rpc
        info = await gateway.hooks.check_subscribe(client.claims, session.client_id, channel)
    reply = _subscribe_reply(session, command, info)
    await client.gateway.hub.subscribe(session, channel, command.since, on_ready=reply)


def subscribe_now(client: Client, command: Command) -> bool:
    channel = command.channel
    _may_subscribe(client, channel)
    gateway = client.gateway
    if gateway.subscribe_hooked and gateway.hooks.applies("subscribe", channel):
        return False  # the backend decides: a wait
    reply = _subscribe_reply(client.session, command)
    hub = gateway.hub
    return hub.subscribe_now(client.session, channel, command.since, on_ready=reply) is not None


async def unsubscribe(client: Client, command: Command) -> dict[str, Any]:
    await client.gateway.hub.unsubscribe(client.session, command.channel)
    return {}


def unsubscribe_now(client: Client, command: Command) -> bool:
    if client.gateway.hub.unsubscribe_now(client.session, command.channel) is None:
        return False
    client.session.push(wire.reply(command.id, {}))
    return True


async def publish(client: Client, command: Command) -> dict[str, Any]:
    channel = command.channel
    require(client.claims.can_publish(channel), "publishing to", channel)
    if not _allowed(client):
        raise GatewayError(ErrorCode.RATE_LIMITED, "publishing too fast")
    gateway = client.gateway
    data = await gateway.hooks.check_publish(
        client.claims, client.session.client_id, channel, command.data
    )
    if data is not command.data and len(data) > gateway.settings.max_message_bytes:
        raise GatewayError(ErrorCode.TOO_LARGE, "the publish hook's data is over the size limit")
    publication = await gateway.hub.publish(channel, data)
    return {"offset": publication.offset, "epoch": publication.epoch}


def _allowed(client: Client) -> bool:
    """A publish or an RPC within the client's rate. Its bucket is made by the first
    one, full, as a bucket made at connect would be by then: most clients never
    publish."""
    limiter = client.publish_limiter
    if limiter is None:
        rate = client.gateway.settings.client_publish_rate
        limiter = client.publish_limiter = RateLimiter(rate)
    return limiter.allow()


async def rpc(client: Client, command: Command) -> dict[str, Any]:
    if not _allowed(client):  # a call to the backend, as a publish is
        raise GatewayError(ErrorCode.RATE_LIMITED, "calling too fast")
    hooks = client.gateway.hooks
    data = await hooks.rpc(client.claims, client.session.client_id, command.channel, command.data)
    return {"data": data}


async def presence(client: Client, command: Command) -> dict[str, Any]:
    channel = command.channel
    require(client.claims.can_subscribe(channel), "presence of", channel)
    entries = await client.gateway.hub.presence(channel)
    return {"clients": [orjson.Fragment(entry) for entry in entries]}


async def history(client: Client, command: Command) -> dict[str, Any]:
    channel = command.channel
    require(client.claims.can_subscribe(channel), "history of", channel)
    page = await client.gateway.hub.history(channel, since=command.since, limit=command.limit)
    if not page.complete:
        raise GatewayError(ErrorCode.NOT_FOUND, "history no longer covers that position")
    return wire.history_body(page)


async def ping(client: Client, command: Command) -> dict[str, Any]:
    return {}


def ping_now(client: Client, command: Command) -> bool:
    client.session.push(wire.reply(command.id, {}))
    return True


async def refresh(client: Client, command: Command) -> dict[str, Any]:
    try:
        claims = client.gateway.verifier.verify(command.token)
    except AuthError as exc:
        raise GatewayError(ErrorCode.UNAUTHORIZED, str(exc)) from None
    held = client.claims
    if claims.user != (held.token_user or held.user):  # the token's, if a hook renamed it
        raise GatewayError(ErrorCode.FORBIDDEN, "a refreshed token must be for the same user")
    client.refresh(claims)
    return {}


OPS: Final[dict[str, Op]] = {
    "subscribe": subscribe,
    "unsubscribe": unsubscribe,
    "publish": publish,
    "presence": presence,
    "history": history,
    "ping": ping,
    "refresh": refresh,
    "rpc": rpc,
}
# The ops that can complete without a wait, when their state allows (``handle_now``).
NOW: Final[dict[str, Callable[[Client, Command], bool]]] = {
    "subscribe": subscribe_now,
    "unsubscribe": unsubscribe_now,
    "ping": ping_now,
}
