"""Tokens and backoff, shared by the WebSocket and SSE clients.

The client reads ``exp`` from a JWT's payload without verifying the signature (the
gateway does that) to know when to refresh it.
"""

from __future__ import annotations

import asyncio
import base64
import random
import time
from collections.abc import Awaitable, Callable

import orjson

from gatewayclient.errors import GatewayError

TokenFactory = Callable[[], Awaitable[str]]
EXPIRY_MARGIN = 5.0  # a token this close to its exp is not used for a new connection


def token_exp(token: str) -> float | None:
    """The ``exp`` claim of a JWT, or None (no claim, or not a JWT we can read)."""
    try:
        payload = token.split(".")[1]
        claims = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError, orjson.JSONDecodeError):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None


def refresh_delay(token: str, before: float, now: float | None = None) -> float | None:
    """Seconds from now until the token should be replaced: ``before`` seconds ahead of
    ``exp``, or halfway through what is left for a token shorter than twice that."""
    exp = token_exp(token)
    if exp is None:
        return None
    left = exp - (time.time() if now is None else now)
    return max(0.0, left - before if left > 2 * before else left / 2)


def backoff(attempt: int, minimum: float, maximum: float) -> float:
    """``min(maximum, minimum * 2**attempt)`` randomised to 50-100 % ("equal jitter")."""
    ceiling = min(maximum, minimum * 2.0 ** min(attempt, 30))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


class TokenSource:
    """The token in use and where new ones come from: one ``token_factory()`` call in
    flight at a time, everything that needs a token waits for it."""

    def __init__(self, token: str | None, factory: TokenFactory | None) -> None:
        if token is None and factory is None:
            raise ValueError("pass token= or token_factory=")
        self.token = token
        self.factory = factory
        self.rejected = False  # the gateway refused it (4001, HTTP 401)
        self._lock = asyncio.Lock()

    def usable(self) -> bool:
        if self.token is None or self.rejected:
            return False
        exp = token_exp(self.token)
        return exp is None or exp - EXPIRY_MARGIN > time.time()

    async def current(self) -> str:
        """A token to connect with: the one in use unless it is missing, rejected or about
        to expire and a factory can give a new one."""
        if self.usable() or self.factory is None:
            if self.token is None or (self.rejected and self.factory is None):
                raise GatewayError("unauthorized", "the gateway rejected the token")
            return self.token
        return await self.renew()

    async def renew(self) -> str:
        if self.factory is None:
            raise GatewayError("unauthorized", "no token_factory to renew the token")
        stale = self.token
        async with self._lock:
            if self.token is not stale and self.usable() and self.token is not None:
                return self.token  # renewed by whoever held the lock
            token = await self.factory()
            self.token, self.rejected = token, False
            return token
