"""FastAPI dependencies: the runtime, the token (``?token=`` or ``Authorization: Bearer``), and
the API's publish rate limit.

All ``async def``: FastAPI runs plain ``def`` dependencies in a thread pool, a
thread hop per dependency per connection for work that takes microseconds.
"""

from __future__ import annotations

import math
from typing import Annotated

from fastapi import Depends, Query
from starlette.requests import HTTPConnection

from auth import AuthError, Claims
from gateway.errors import ErrorCode, GatewayError
from gateway.query import token_of
from gateway.ratelimit import RateLimiter
from gateway.runtime import Gateway


async def get_gateway(conn: HTTPConnection) -> Gateway:
    gateway: Gateway = conn.app.state.gateway
    return gateway


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


async def require_claims(claims: Annotated[Claims | AuthError, Depends(verified_claims)]) -> Claims:
    """For HTTP: a bad token is a 401 with a JSON error body."""
    if isinstance(claims, AuthError):
        raise GatewayError(ErrorCode.UNAUTHORIZED, str(claims))
    return claims


GatewayDep = Annotated[Gateway, Depends(get_gateway)]
ClaimsDep = Annotated[Claims, Depends(require_claims)]
MaybeClaimsDep = Annotated[Claims | AuthError, Depends(verified_claims)]


class ApiRateLimit:
    """Per-user token buckets for publishing through the API (off when the rate is 0),
    the gateway's own (``Gateway.api_buckets``: one app's rate is not another's)."""

    async def __call__(self, gateway: GatewayDep, claims: ClaimsDep) -> Claims:
        rate = gateway.settings.api_publish_rate
        if rate:
            buckets = gateway.api_buckets
            if len(buckets) > 100_000:
                buckets.clear()
            bucket = buckets.get(claims.user)
            if bucket is None:
                bucket = buckets[claims.user] = RateLimiter(rate)
            if not bucket.allow():
                retry = str(max(1, math.ceil(bucket.wait())))  # whole seconds (RFC 9110)
                raise GatewayError(
                    ErrorCode.RATE_LIMITED, "publishing too fast", headers={"retry-after": retry}
                )
        return claims


PublisherDep = Annotated[Claims, Depends(ApiRateLimit())]
