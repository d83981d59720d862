"""Who may open a WebSocket: the refusals before the handshake, and the connect hook's
say (``gateway.hooks``), the same for the endpoint and for the opener below ASGI."""

from __future__ import annotations

from dataclasses import dataclass

from auth import AuthError, Claims
from channels.session import new_client_id
from gateway.errors import (
    MAX_CLOSE_REASON,
    Close,
    CloseCode,
    ErrorCode,
    GatewayError,
    refusal_name,
)
from gateway.hooks import Cookies, Grant, HeaderLookup, Opening, Refusal
from gateway.runtime import Gateway


def refusal(
    gateway: Gateway, origin: str | None, claims: Claims | AuthError, hooked: bool = False
) -> Close | None:
    """Why a WebSocket must be closed right after its handshake (counted); None: it may
    open. ``hooked``: the connect hook decides a connection without a token."""
    if not gateway.origin_allowed(origin):
        return refused(gateway, CloseCode.ORIGIN_NOT_ALLOWED)
    if gateway.draining:
        return refused(gateway, CloseCode.SERVICE_RESTART)
    if gateway.connections.at_capacity:
        return refused(gateway, CloseCode.TRY_AGAIN_LATER)
    if isinstance(claims, AuthError) and not (hooked and claims.missing):
        close = CloseCode.TOKEN_EXPIRED if claims.expired else CloseCode.UNAUTHORIZED
        return refused(gateway, close)
    return None


def refused(gateway: Gateway, close: Close) -> Close:
    """``close``, counted as a WebSocket refused (gateway_connections_refused_total)."""
    gateway.connections.refuse("websocket", refusal_name(close))
    return close


def hook_close(exc: GatewayError) -> Close:
    """The close frame for a connect hook's refusal or failure."""
    if exc.code is ErrorCode.UNAUTHORIZED:
        return CloseCode.UNAUTHORIZED
    if not isinstance(exc, Refusal):  # no answer (a refusal coded internal is a refusal)
        return CloseCode.CONNECT_HOOK_FAILED
    reason = exc.message.encode()[:MAX_CLOSE_REASON].decode(errors="ignore")
    return Close(CloseCode.REFUSED.code, reason or CloseCode.REFUSED.reason)


@dataclass(frozen=True, slots=True)
class Admitted:
    """The connect hook's yes: the connection's claims, its grant and its client id."""

    claims: Claims
    grant: Grant
    client_id: str


async def ask_backend(
    gateway: Gateway, claims: Claims | AuthError, cookies: Cookies, headers: HeaderLookup
) -> Admitted | Close:
    """The connect hook's answer for a WebSocket holding ``claims`` (a missing token's
    ``AuthError``: none), or the close frame that refuses it."""
    token_claims = None if isinstance(claims, AuthError) else claims
    client_id = new_client_id()
    opening = Opening("websocket", client_id, cookies, headers)
    try:
        grant = await gateway.hooks.connect(token_claims, opening)
    except GatewayError as exc:
        return refused(gateway, hook_close(exc))
    if gateway.draining:  # while the backend answered
        return refused(gateway, CloseCode.SERVICE_RESTART)
    return Admitted(grant.apply(token_claims), grant, client_id)
