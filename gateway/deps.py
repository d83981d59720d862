"""FastAPI dependencies: the runtime, the token (``?token=`` or ``Authorization: Bearer``), and
the API's publish rate limit.

All ``async def``: FastAPI runs plain ``def`` dependencies in a thread pool, a
thread hop per dependency per connection for work that takes microseconds.
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import unquote_plus

from fastapi import Depends, Query
from starlette.requests import HTTPConnection

from auth import AuthError, Claims
from gateway.errors import ErrorCode, GatewayError
from gateway.ratelimit import RateLimiter
from gateway.runtime import Gateway


async def get_gateway(conn: HTTPConnection) -> Gateway:
    gateway: Gateway = conn.app.state.gateway
    return gateway


def token_of(query_token: str | None, authorization: str | None) -> str | None:
    """The token a request carries: ``?token=``, else ``Authorization: Bearer``."""
    if query_token:
        return query_token
    scheme, _, credentials = (authorization or "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return None


def query_params(query: bytes) -> dict[str, list[str]]:
    """A raw query string's parameters exactly as starlette's ``QueryParams`` gives them
    (``parse_qsl`` with blank values kept; ``getlist`` of each name), parsed once for
    the paths that skip the framework."""
    found: dict[str, list[str]] = {}
    for part in query.decode("latin-1").split("&"):
        if not part:
            continue
        key, _, value = part.partition("=")
        if "%" in key or "+" in key:
            key = unquote_plus(key)
        if "%" in value or "+" in value:
            value = unquote_plus(value)
        values = found.get(key)
        if values is None:
            found[key] = [value]
        else:
            values.append(value)
    return found


def last_of(params: dict[str, list[str]], name: str) -> str | None:
    """``QueryParams.get``: the last value of ``name``."""
    values = params.get(name)
    return values[-1] if values else None


def query_value(query: bytes, name: str) -> str | None:
    """``QueryParams.get`` of a raw query string."""
    text = query.decode("latin-1")
    if "&" not in text and "%" not in text and "+" not in text:  # one plain parameter
        key, _, value = text.partition("=")
        return value if key == name and text else None
    return last_of(query_params(query), name)


async def bearer_or_query_token(
    conn: HTTPConnection,
    token: Annotated[str | None, Query(description="JWT (browsers cannot set headers)")] = None,
) -> str | None:
    return token_of(token, conn.headers.get("authorization"))


async def verified_claims(
    gateway: Annotated[Gateway, Depends(get_gateway)],
    token: Annotated[str | None, Depends(bearer_or_query_token)],
) -> Claims | AuthError:
    """For WebSockets the error is returned, not raised: the endpoint accepts, then closes 4001."""
    try:
        return gateway.verifier.verify(token)
    except AuthError as exc:
        return exc


def hooked(gateway: Gateway, claims: Claims | AuthError) -> bool:
    """Whether the connect hook decides this connection (a bad token never gets there)."""
    if isinstance(claims, AuthError):
        return claims.missing and gateway.hooks.connects(has_token=False)
    return gateway.hooks.connects(has_token=True)


async def require_claims(claims: Annotated[Claims | AuthError, Depends(verified_claims)]) -> Claims:
    """For HTTP: a bad token is a 401 with a JSON error body."""
    if isinstance(claims, AuthError):
        raise GatewayError(ErrorCode.UNAUTHORIZED, str(claims))
    return claims


GatewayDep = Annotated[Gateway, Depends(get_gateway)]
ClaimsDep = Annotated[Claims, Depends(require_claims)]
MaybeClaimsDep = Annotated[Claims | AuthError, Depends(verified_claims)]


class ApiRateLimit:
    """Per-user token buckets for publishing through the API (off when the rate is 0)."""

    def __init__(self) -> None:
        self._buckets: dict[str, RateLimiter] = {}

    async def __call__(self, gateway: GatewayDep, claims: ClaimsDep) -> Claims:
        rate = gateway.settings.api_publish_rate
        if rate:
            if len(self._buckets) > 100_000:
                self._buckets.clear()
            bucket = self._buckets.setdefault(claims.user, RateLimiter(rate))
            if not bucket.allow():
                raise GatewayError(ErrorCode.RATE_LIMITED, "publishing too fast")
        return claims


PublisherDep = Annotated[Claims, Depends(ApiRateLimit())]
