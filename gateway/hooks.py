"""Backend hooks: the application's backend decides connects, subscriptions and client
publications, and answers the ``rpc`` command.

``GATEWAY_HOOKS`` names the hooks, each with the URL the gateway POSTs to and its
timeout in seconds; subscribe and publish apply to channel patterns, rpc to method
patterns, connect to every connection (or, ``"with_token": false``, to those without a
token) and sends the request's cookies and the headers it names:

    {"connect":   {"url": "http://app/hooks/connect", "headers": ["user-agent"]},
     "subscribe": {"url": "http://app/hooks/subscribe", "channels": ["private:*"], "timeout": 2},
     "publish":   {"url": "http://app/hooks/publish",   "channels": ["chat:*"],    "timeout": 2},
     "rpc":       {"url": "http://app/hooks/rpc",       "methods": ["history"]}}

A hook runs only after the gateway's own checks passed; other channels never wait
on it. Each hook's calls go through a pool of keep-alive connections of its own
(``PooledClient``), each call with its hook's timeout for the whole exchange. Whatever
goes wrong with a call (timeout, connection refused, a status other than 2xx, a body not
the expected JSON) fails that one command with ``internal``: a backend down never
hangs a client nor delays anyone else. The request and reply shapes are in docs/protocol.md.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol, TypeVar

import aiohttp
import orjson
from prometheus_client import Counter, Histogram

from auth import Claims, PatternSet
from auth.tokens import MAX_INFO_BYTES
from channels.log_throttle import LogThrottles
from channels.names import is_valid_channel
from gateway.errors import ErrorCode, GatewayError
from gateway.pooled_http import PooledClient, ReplyTooLarge
from gateway.settings import json_object

logger = logging.getLogger(__name__)

# Each hook and the keys its configuration may have.
HOOK_KEYS = {
    "connect": ("url", "timeout", "headers", "with_token"),
    "subscribe": ("url", "timeout", "channels"),
    "publish": ("url", "timeout", "channels"),
    "rpc": ("url", "timeout", "methods"),
}
# The codes a refusal may carry: the contract's WebSocket error codes.
REFUSAL_CODES = frozenset(ErrorCode)
DEFAULT_TIMEOUT = 2.0
JSON_HEADERS = {"content-type": "application/json"}
# A reply's body, read at most: what a backend sends is parsed on the worker's loop
# (and an rpc's data or a subscribe's info goes on to the client in one frame).
MAX_REPLY_BYTES: Final = 1 << 20
NO_INFO: Final[Any] = object()  # a subscribe hook's allow that attached nothing


@dataclass(frozen=True, slots=True)
class Hook:
    name: str
    url: str
    channels: PatternSet  # the channels (subscribe, publish) or methods (rpc) it applies to
    timeout: float = DEFAULT_TIMEOUT
    headers: tuple[str, ...] = ()  # connect: the request headers it is sent
    with_token: bool = True  # connect: also for connections that carry a token


def _patterns(name: str, spec: dict[str, Any], key: str, default: list[str] | None) -> PatternSet:
    patterns = spec.get(key, default)
    if (
        not isinstance(patterns, list)
        or not patterns
        or not all(isinstance(p, str) and p for p in patterns)
    ):
        raise ValueError(
            f"GATEWAY_HOOKS: hook {name!r} needs {key!r}, a non-empty list of patterns"
        )
    return PatternSet(patterns)


def load_hooks(raw: str) -> dict[str, Hook]:
    """Parse ``GATEWAY_HOOKS``; raises ValueError naming what is wrong (at start-up)."""
    config = json_object(raw, "GATEWAY_HOOKS", "hook name -> hook")
    hooks: dict[str, Hook] = {}
    for name, spec in config.items():
        keys = HOOK_KEYS.get(name)
        if keys is None:
            known = ", ".join(HOOK_KEYS)
            raise ValueError(f"GATEWAY_HOOKS: unknown hook {name!r} (known: {known})")
        if not isinstance(spec, dict):
            raise ValueError(f"GATEWAY_HOOKS: hook {name!r} must be an object")
        unknown = sorted(set(spec) - set(keys))
        if unknown:
            known = ", ".join(keys)
            raise ValueError(f"GATEWAY_HOOKS: hook {name!r}: unknown key {unknown[0]!r} ({known})")
        url = spec.get("url")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"GATEWAY_HOOKS: hook {name!r} needs an http(s) 'url'")
        timeout = spec.get("timeout", DEFAULT_TIMEOUT)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
            raise ValueError(f"GATEWAY_HOOKS: hook {name!r}: timeout must be a positive number")
        if name == "connect":
            headers = spec.get("headers", [])
            if not isinstance(headers, list) or not all(isinstance(h, str) and h for h in headers):
                raise ValueError("GATEWAY_HOOKS: hook 'connect': 'headers' must be a list of names")
            with_token = spec.get("with_token", True)
            if not isinstance(with_token, bool):
                raise ValueError(
                    "GATEWAY_HOOKS: hook 'connect': 'with_token' must be true or false"
                )
            names = tuple(h.lower() for h in headers)
            hooks[name] = Hook(name, url, PatternSet(["*"]), float(timeout), names, with_token)
        else:
            key, default = ("methods", ["*"]) if name == "rpc" else ("channels", None)
            patterns = _patterns(name, spec, key, default)
            hooks[name] = Hook(name, url, patterns, float(timeout))
    return hooks


class Refusal(GatewayError):
    """A hook's ``refuse`` (not a failure to get an answer): its code and message."""


class HookFailed(Exception):
    """A call that did not get a usable answer; ``outcome`` is its metrics label."""

    def __init__(self, outcome: str, message: str) -> None:
        super().__init__(message)
        self.outcome = outcome


def claims_body(claims: Claims) -> dict[str, Any]:
    """What a hook is told of the client's token."""
    ends = [t for t in (claims.expires_at, claims.ends_at) if t is not None]
    exp = min(ends) if ends else None
    return {
        "sub": claims.user,
        "exp": int(exp) if exp is not None and exp < 2**63 and exp == int(exp) else exp,
        "subscribe": list(claims.subscribe.patterns),
        "publish": list(claims.publish.patterns),
        "info": claims.info,
    }


Cookies = Mapping[str, str]


class HeaderLookup(Protocol):
    def get(self, name: str, /) -> str | None:
        """The first value of header ``name`` (lower-case), None when absent."""


@dataclass(frozen=True, slots=True)
class Opening:
    """What the connect hook is told of a connection being opened."""

    transport: str  # "websocket" or "sse"
    client: str  # the client id the connection will have
    cookies: Cookies
    headers: HeaderLookup  # the request's
    channels: list[str] | None = None  # SSE: the stream's ?channel= list


@dataclass(frozen=True, slots=True)
class Grant:
    """A connect hook's ``allow``: what it changes of the connection's claims."""

    user: str | None = None
    info: dict[str, Any] | None = None
    subscribe: tuple[str, ...] = ()
    publish: tuple[str, ...] = ()
    channels: tuple[str, ...] = ()  # subscribed server-side
    expire_at: float | None = None

    def apply(self, claims: Claims | None) -> Claims:
        """The connection's claims: the token's (if any) with this grant on top."""
        user = self.user or (claims.user if claims is not None else None)
        assert user, "a grant for a connection without a token names its user"
        base_sub = claims.subscribe.patterns if claims is not None else ()
        base_pub = claims.publish.patterns if claims is not None else ()
        info = self.info if self.info is not None else (claims.info if claims is not None else {})
        return Claims(
            user=user,
            expires_at=claims.expires_at if claims is not None else None,
            subscribe=PatternSet(base_sub + self.subscribe),
            publish=PatternSet(base_pub + self.publish),
            info=info,
            ends_at=self.expire_at,  # then, to the second: no clock skew to allow for
            token_user=claims.user if claims is not None and claims.user != user else None,
        )


def _pattern_list(reply: dict[str, Any], key: str) -> tuple[str, ...]:
    value = reply.get(key, [])
    if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
        raise HookFailed("bad_reply", f"{key!r} must be a list of patterns")
    return tuple(value)


def parse_grant(reply: dict[str, Any], has_token: bool, max_channels: int) -> Grant:
    """The ``allow`` of a connect hook, or HookFailed("bad_reply") saying what is wrong."""
    user = reply.get("user")
    if user is not None and (not isinstance(user, str) or not user or len(user) > 256):
        raise HookFailed("bad_reply", "'user' must be a non-empty string")
    if user is None and not has_token:
        raise HookFailed("bad_reply", "an allow for a connection without a token needs 'user'")
    info = reply.get("info")
    if info is not None and (
        not isinstance(info, dict) or len(orjson.dumps(info)) > MAX_INFO_BYTES
    ):
        raise HookFailed(
            "bad_reply", f"'info' must be a JSON object of at most {MAX_INFO_BYTES} bytes"
        )
    channels = _pattern_list(reply, "channels")
    if not all(is_valid_channel(c) for c in channels):
        raise HookFailed("bad_reply", "'channels' holds an invalid channel name")
    if len(set(channels)) > max_channels:
        raise HookFailed("bad_reply", f"more than {max_channels} 'channels'")
    expire_at = reply.get("expire_at")
    if expire_at is not None and (
        isinstance(expire_at, bool) or not isinstance(expire_at, int | float)
    ):
        raise HookFailed("bad_reply", "'expire_at' must be a number (Unix seconds)")
    return Grant(
        user=user,
        info=info,
        subscribe=_pattern_list(reply, "subscribe"),
        publish=_pattern_list(reply, "publish"),
        channels=tuple(dict.fromkeys(channels)),
        expire_at=float(expire_at) if expire_at is not None else None,
    )


T = TypeVar("T")


class Hooks:
    """The configured hooks and the one HTTP client they share."""

    def __init__(
        self,
        hooks: dict[str, Hook],
        seconds: Histogram,
        outcomes: Counter,
        *,
        max_channels: int = 128,
    ) -> None:
        self.hooks = hooks
        self.max_channels = max_channels
        self._seconds = seconds
        self._outcomes = outcomes
        # A pool a hook: a slow rpc method's calls by the hundred starve no connect.
        self._clients = {name: PooledClient() for name in hooks}
        # A backend that is down fails every call (a reconnect storm through the connect
        # hook: two lines per client): a line a while per hook and kind of line.
        self._failure_logs = LogThrottles(logger)

    def applies(self, name: str, channel: str) -> bool:
        """Whether hook ``name`` runs for ``channel`` (False when it is not configured)."""
        hook = self.hooks.get(name)
        return hook is not None and hook.channels(channel)

    def connects(self, has_token: bool) -> bool:
        """Whether the connect hook runs for a connection with (or without) a valid token."""
        hook = self.hooks.get("connect")
        return hook is not None and (hook.with_token or not has_token)

    async def close(self) -> None:
        for client in self._clients.values():
            await client.aclose()

    async def connect(self, claims: Claims | None, opening: Opening) -> Grant:
        """The backend's grant for a connection holding ``claims`` (None: no token); else
        the ``GatewayError`` of its refusal, or ``internal``."""
        hook = self.hooks["connect"]
        body: dict[str, Any] = {
            "transport": opening.transport,
            "client": opening.client,
            "claims": claims_body(claims) if claims is not None else None,
            "origin": opening.headers.get("origin"),
            "cookies": dict(opening.cookies),
            "headers": {n: v for n in hook.headers if (v := opening.headers.get(n)) is not None},
        }
        if opening.channels is not None:
            body["channels"] = opening.channels
        has_token = claims is not None
        return await self._call(
            hook,
            orjson.dumps(body),
            "allow",
            lambda reply: parse_grant(reply, has_token, self.max_channels),
        )

    async def check_subscribe(self, claims: Claims, client: str, channel: str) -> Any:
        """What the backend attached to its allow (``NO_INFO``: nothing, or no hook for
        ``channel``); else the ``GatewayError`` of its refusal."""
        if not self.applies("subscribe", channel):
            return NO_INFO
        body: dict[str, Any] = {"channel": channel, "user": claims.user, "client": client}
        body["claims"] = claims_body(claims)
        hook = self.hooks["subscribe"]
        return await self._call(
            hook, orjson.dumps(body), "allow", lambda reply: reply.get("info", NO_INFO)
        )

    async def check_publish(self, claims: Claims, client: str, channel: str, data: bytes) -> bytes:
        """The data to publish (the backend's, when it returned some), or the ``GatewayError``."""
        if not self.applies("publish", channel):
            return data
        body: dict[str, Any] = {"channel": channel, "user": claims.user, "client": client}
        body["data"] = orjson.Fragment(data)
        return await self._call(
            self.hooks["publish"],
            orjson.dumps(body),
            "accept",
            lambda reply: orjson.dumps(reply["data"]) if "data" in reply else data,
        )

    async def rpc(self, claims: Claims, client: str, method: str, data: bytes) -> Any:
        """The backend's answer to ``method`` (its ``data``), or the ``GatewayError``."""
        if not self.applies("rpc", method):
            raise GatewayError(ErrorCode.NOT_FOUND, f"no rpc method {method}")
        body: dict[str, Any] = {"method": method, "user": claims.user, "client": client}
        body["data"] = orjson.Fragment(data)
        body["claims"] = claims_body(claims)
        return await self._call(
            self.hooks["rpc"], orjson.dumps(body), "ok", lambda reply: reply.get("data")
        )

    def _refusal(self, name: str, reply: dict[str, Any]) -> GatewayError:
        code = reply.get("code", ErrorCode.FORBIDDEN)
        if not isinstance(code, str) or code not in REFUSAL_CODES:  # (a list: unhashable)
            code = ErrorCode.FORBIDDEN
        message = reply.get("message")
        if not isinstance(message, str) or not message:
            message = f"refused by the {name} hook"
        return Refusal(ErrorCode(code), message)

    async def _call(
        self, hook: Hook, body: bytes, accepted: str, parse: Callable[[dict[str, Any]], T]
    ) -> T:
        """``parse`` of the hook's reply when its ``result`` is ``accepted`` (``parse`` may
        raise ``HookFailed("bad_reply")``); the ``GatewayError`` of a ``refuse``; every
        failure is an ``internal`` GatewayError."""
        started = time.perf_counter()
        try:
            reply = await self._post(hook, body)
            result = reply.get("result")
            if result == accepted:
                value = parse(reply)
            elif result != "refuse":
                raise HookFailed("bad_reply", f"unknown result {str(result)[:40]!r}")
        except HookFailed as exc:
            self._observe(hook, started, exc.outcome)
            self._failure_logs[hook.name, "failed"].warning("%s hook failed: %s", hook.name, exc)
            raise GatewayError(ErrorCode.INTERNAL, f"{hook.name} hook failed: {exc}") from None
        self._observe(hook, started, str(result))
        if result != accepted:
            raise self._refusal(hook.name, reply)
        return value

    async def _post(self, hook: Hook, body: bytes) -> dict[str, Any]:
        client = self._clients[hook.name]
        try:
            async with asyncio.timeout(hook.timeout):  # the whole call
                status, content = await client.post(hook.url, body, JSON_HEADERS, MAX_REPLY_BYTES)
        except TimeoutError:
            raise HookFailed("timeout", f"no answer within {hook.timeout:g}s") from None
        except ReplyTooLarge:
            raise HookFailed("bad_reply", "the reply is over 1 MiB") from None
        except (aiohttp.ClientError, OSError) as exc:
            # The exception's text (the backend's address) for the log, not for clients.
            self._failure_logs[hook.name, "error"].warning(
                "%s hook: %s: %s", hook.name, type(exc).__name__, str(exc)[:200]
            )
            raise HookFailed("unreachable", "the backend could not be reached") from None
        if not 200 <= status < 300:
            raise HookFailed("bad_status", f"HTTP {status}")
        try:
            reply = orjson.loads(content)
        except orjson.JSONDecodeError:
            raise HookFailed("bad_reply", "the reply is not JSON") from None
        if not isinstance(reply, dict):
            raise HookFailed("bad_reply", "the reply is not a JSON object")
        try:  # what the gateway writes of it (data, info) must be writable: orjson
            # reads 1,024 levels of nesting, writes 254, and a reply's data or info is
            # written up to two levels deeper than in the reply (an rpc's or subscribe's
            # result, a presence entry in its list)
            orjson.dumps([[reply]])
        except orjson.JSONEncodeError:
            raise HookFailed("bad_reply", "the reply is nested too deeply") from None
        return reply

    def _observe(self, hook: Hook, started: float, outcome: str) -> None:
        self._seconds.labels(hook.name).observe(time.perf_counter() - started)
        self._outcomes.labels(hook.name, outcome).inc()
