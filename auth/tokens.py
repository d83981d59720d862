"""JSON Web Tokens: HS256 with a shared secret, or RS256/ES256 with a PEM public key.

The token itself is never logged: errors name what is wrong with it, not what it is.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import jwt
import orjson

from auth.permissions import PatternSet, pattern_set

MAX_INFO_BYTES = 4096


class AuthError(Exception):
    """A token that cannot be used. ``expired`` tells the two close reasons apart;
    ``missing``: there was no token at all."""

    def __init__(self, message: str, *, expired: bool = False, missing: bool = False) -> None:
        super().__init__(message)
        self.expired = expired
        self.missing = missing


@dataclass(slots=True, frozen=True)
class Claims:
    user: str
    expires_at: float | None = None  # the token's ``exp``: honoured with the leeway
    subscribe: PatternSet = field(default_factory=PatternSet)
    publish: PatternSet = field(default_factory=PatternSet)
    info: dict[str, Any] = field(default_factory=dict)
    ends_at: float | None = None  # a moment the connection ends, no leeway (a backend's)
    # The ``sub`` of the token a connection opened with, where the connect hook named
    # another user (``user``); a refreshed token is for this one.
    token_user: str | None = None

    def can_subscribe(self, channel: str) -> bool:
        return self.subscribe(channel)

    def can_publish(self, channel: str) -> bool:
        return self.publish(channel)


def _patterns(payload: dict[str, Any], claim: str) -> PatternSet:
    value = payload.get(claim, [])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise AuthError(f"claim {claim!r} must be a list of channel patterns")
    return pattern_set(value)


class TokenVerifier:
    """Verifies tokens, and remembers the ones it verified.

    A JWT is immutable: the same string always carries the same claims, signed by the
    same key, so a token verified once need not be verified again (its signature check,
    base64 and JSON decoding are most of a connect's cost when clients reconnect). The
    ``cache_size`` most recent valid tokens are kept with their claims; an entry ends at
    the token's ``exp`` plus the leeway, like the token itself. Invalid tokens are never
    kept. The key is fixed for a verifier's life: a new key means a new verifier, and a
    new cache.
    """

    def __init__(
        self,
        *,
        secret: str = "",
        public_key: str = "",
        leeway: float = 5.0,
        cache_size: int = 4096,
    ) -> None:
        if public_key:
            self._key: Any = public_key
            self._algorithms = ["RS256", "ES256"]
        elif secret:
            self._key = secret
            self._algorithms = ["HS256"]
        else:
            raise ValueError("a JWT secret or public key is required")
        self.leeway = leeway
        self.cache_size = cache_size
        self._verified: dict[str, Claims] = {}  # insertion order: the oldest goes first

    def verify(self, token: str | None) -> Claims:
        if not token:
            raise AuthError("token required", missing=True)
        claims = self._verified.get(token)
        if claims is not None:
            if claims.expires_at is not None and time.time() > claims.expires_at + self.leeway:
                del self._verified[token]
                raise AuthError("token expired", expired=True)
            return claims
        claims = self._decode(token)
        if self.cache_size > 0:
            if len(self._verified) >= self.cache_size:
                del self._verified[next(iter(self._verified))]
            self._verified[token] = claims
        return claims

    def _decode(self, token: str) -> Claims:
        try:
            payload = jwt.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                leeway=self.leeway,
                options={"require": ["sub"], "verify_aud": False},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired", expired=True) from None
        except jwt.PyJWTError as exc:
            # Any of PyJWT's refusals: InvalidTokenError's, and InvalidKeyError's for a
            # token whose algorithm is not the key's kind (ES256 against an RSA key).
            raise AuthError(f"invalid token: {exc.__class__.__name__}") from None
        sub = payload.get("sub")
        if not isinstance(sub, str) or not sub:
            raise AuthError("claim 'sub' must be a non-empty string")
        info = payload.get("info", {})
        if not isinstance(info, dict):
            raise AuthError("claim 'info' must be a JSON object")
        if info and len(orjson.dumps(info)) > MAX_INFO_BYTES:  # told to every member
            raise AuthError(f"claim 'info' is over {MAX_INFO_BYTES} bytes")
        exp = payload.get("exp")
        # A NumericDate is a JSON number (RFC 7519); PyJWT also takes "1796000000", which
        # would then never be held to: refused, as the other claims of the wrong type.
        # Nor NaN or an infinity (Python's JSON reads them), nor a number past what a date
        # needs: a hook's request could not carry it, a float of it could overflow.
        for claim in ("exp", "nbf", "iat"):
            value = payload.get(claim)
            if value is not None and (
                type(value) is bool
                or not isinstance(value, int | float)
                or not -(2**63) <= value < 2**63
            ):
                raise AuthError(f"claim {claim!r} must be a number")
        return Claims(
            user=sub,
            expires_at=None if exp is None else float(exp),
            subscribe=_patterns(payload, "subscribe"),
            publish=_patterns(payload, "publish"),
            info=info,
        )

    def deadline(self, claims: Claims) -> float | None:
        """Wall-clock time after which a connection holding these claims must close: the
        token's ``exp`` and the leeway, or ``ends_at`` when that comes first."""
        exp, ends = claims.expires_at, claims.ends_at
        deadline = None if exp is None else exp + self.leeway
        if ends is not None and (deadline is None or ends < deadline):
            return ends
        return deadline


def make_token(
    secret: str,
    user: str,
    *,
    subscribe: list[str] | None = None,
    publish: list[str] | None = None,
    info: dict[str, Any] | None = None,
    ttl: float | None = 86_400,
) -> str:
    """An HS256 token (dev mode, tests, tools)."""
    payload: dict[str, Any] = {"sub": user}
    if subscribe is not None:
        payload["subscribe"] = subscribe
    if publish is not None:
        payload["publish"] = publish
    if info is not None:
        payload["info"] = info
    if ttl is not None:
        payload["exp"] = int(time.time() + ttl)
    return jwt.encode(payload, secret, algorithm="HS256")


def new_dev_secret() -> str:
    return secrets.token_urlsafe(32)
