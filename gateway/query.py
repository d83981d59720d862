"""A request's token and query parameters, read from its raw bytes: for the paths that
open a connection without the framework (``gateway.ws``, ``gateway.sse_opener``) and for
the dependencies that read them through it (``gateway.deps``). Compiled (setup.py).
"""

from __future__ import annotations

from urllib.parse import unquote_plus

from auth import AuthError, Claims
from gateway.runtime import Gateway


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
    text = query.decode("latin-1")
    quoted = "%" in text or "+" in text  # (most are not: each part is looked at once)
    for part in text.split("&"):
        if not part:
            continue
        at = part.find("=")
        if at < 0:
            key, value = part, ""
        else:
            key, value = part[:at], part[at + 1 :]
        if quoted:
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


def hooked(gateway: Gateway, claims: Claims | AuthError) -> bool:
    """Whether the connect hook decides this connection (a bad token never gets there)."""
    if not gateway.connect_hooked:
        return False
    if isinstance(claims, AuthError):
        return claims.missing and gateway.hooks.connects(has_token=False)
    return gateway.hooks.connects(has_token=True)
