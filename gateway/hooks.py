"""Backend hooks: the application's backend decides subscriptions and client publications.

``GATEWAY_HOOKS`` names the hooks, each with the URL the gateway POSTs to, the
channel patterns it applies to and its timeout in seconds:

    {"subscribe": {"url": "http://app/hooks/subscribe", "channels": ["private:*"], "timeout": 2},
     "publish":   {"url": "http://app/hooks/publish",   "channels": ["chat:*"],    "timeout": 2}}

A hook runs only for channels matching its patterns, after the token's own
permission check passed; other channels never wait on it. Every call shares one
pooled ``httpx.AsyncClient`` and has a deadline of the hook's timeout for the
whole exchange. Whatever goes wrong with a call (timeout, connection refused, a
status other than 2xx, a body that is not the expected JSON) fails that one
command with ``internal``: a backend down never hangs a client nor delays
anyone else. The request and reply shapes are in docs/protocol.md.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
from prometheus_client import Counter, Histogram

from auth import Claims, PatternSet
from gateway.errors import ErrorCode, GatewayError
from gateway.settings import json_object

logger = logging.getLogger(__name__)

HOOK_NAMES = ("subscribe", "publish")
# The codes a refusal may carry: the contract's WebSocket error codes.
REFUSAL_CODES = frozenset(code for code in ErrorCode if code is not ErrorCode.UNAVAILABLE)
DEFAULT_TIMEOUT = 2.0


@dataclass(frozen=True, slots=True)
class Hook:
    name: str
    url: str
    channels: PatternSet
    timeout: float = DEFAULT_TIMEOUT


def load_hooks(raw: str) -> dict[str, Hook]:
    """Parse ``GATEWAY_HOOKS``; raises ValueError naming what is wrong (at start-up)."""
    config = json_object(raw, "GATEWAY_HOOKS", "hook name -> hook")
    hooks: dict[str, Hook] = {}
    for name, spec in config.items():
        if name not in HOOK_NAMES:
            known = ", ".join(HOOK_NAMES)
            raise ValueError(f"GATEWAY_HOOKS: unknown hook {name!r} (known: {known})")
        if not isinstance(spec, dict):
            raise ValueError(f"GATEWAY_HOOKS: hook {name!r} must be an object")
        url = spec.get("url")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"GATEWAY_HOOKS: hook {name!r} needs an http(s) 'url'")
        patterns = spec.get("channels")
        if (
            not isinstance(patterns, list)
            or not patterns
            or not all(isinstance(p, str) and p for p in patterns)
        ):
            raise ValueError(
                f"GATEWAY_HOOKS: hook {name!r} needs 'channels', a non-empty list of patterns"
            )
        timeout = spec.get("timeout", DEFAULT_TIMEOUT)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
            raise ValueError(f"GATEWAY_HOOKS: hook {name!r}: timeout must be a positive number")
        hooks[name] = Hook(name, url, PatternSet(patterns), float(timeout))
    return hooks


class HookFailed(Exception):
    """A call that did not get a usable answer; ``outcome`` is its metrics label."""

    def __init__(self, outcome: str, message: str) -> None:
        super().__init__(message)
        self.outcome = outcome


def claims_body(claims: Claims) -> dict[str, Any]:
    """What a hook is told of the client's token."""
    return {
        "sub": claims.user,
        "exp": claims.expires_at,
        "subscribe": list(claims.subscribe.patterns),
        "publish": list(claims.publish.patterns),
        "info": claims.info,
    }


class Hooks:
    """The configured hooks and the one HTTP client they share."""

    def __init__(self, hooks: dict[str, Hook], seconds: Histogram, outcomes: Counter) -> None:
        self.hooks = hooks
        self._seconds = seconds
        self._outcomes = outcomes
        self._client: httpx.AsyncClient | None = None
        if hooks:
            self._client = httpx.AsyncClient(follow_redirects=False)

    def applies(self, name: str, channel: str) -> bool:
        """Whether hook ``name`` runs for ``channel`` (False when it is not configured)."""
        hook = self.hooks.get(name)
        return hook is not None and hook.channels(channel)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    async def check_subscribe(self, claims: Claims, client: str, channel: str) -> None:
        """Nothing when the backend allows the subscription; else the ``GatewayError``."""
        if not self.applies("subscribe", channel):
            return
        body: dict[str, Any] = {"channel": channel, "user": claims.user, "client": client}
        body["claims"] = claims_body(claims)
        reply = await self._call(self.hooks["subscribe"], orjson.dumps(body), ("allow",))
        if reply["result"] != "allow":
            raise self._refusal("subscribe", reply)

    async def check_publish(self, claims: Claims, client: str, channel: str, data: bytes) -> bytes:
        """The data to publish (the backend's, when it returned some), or the ``GatewayError``."""
        if not self.applies("publish", channel):
            return data
        body: dict[str, Any] = {"channel": channel, "user": claims.user, "client": client}
        body["data"] = orjson.Fragment(data)
        reply = await self._call(self.hooks["publish"], orjson.dumps(body), ("accept",))
        if reply["result"] != "accept":
            raise self._refusal("publish", reply)
        if "data" in reply:
            return orjson.dumps(reply["data"])
        return data

    def _refusal(self, name: str, reply: dict[str, Any]) -> GatewayError:
        code = reply.get("code", ErrorCode.FORBIDDEN)
        if code not in REFUSAL_CODES:
            code = ErrorCode.FORBIDDEN
        message = reply.get("message")
        if not isinstance(message, str) or not message:
            message = f"refused by the {name} hook"
        return GatewayError(ErrorCode(code), message)

    async def _call(self, hook: Hook, body: bytes, accepted: tuple[str, ...]) -> dict[str, Any]:
        """The hook's reply, a JSON object whose ``result`` is one of ``accepted`` or
        ``refuse``; every failure is an ``internal`` GatewayError."""
        started = time.perf_counter()
        try:
            reply = await self._post(hook, body)
            result = reply.get("result")
            if result not in (*accepted, "refuse"):
                raise HookFailed("bad_reply", f"unknown result {str(result)[:40]!r}")
        except HookFailed as exc:
            self._observe(hook, started, exc.outcome)
            logger.warning("%s hook failed: %s", hook.name, exc)
            raise GatewayError(ErrorCode.INTERNAL, f"{hook.name} hook failed: {exc}") from None
        self._observe(hook, started, str(result))
        return reply

    async def _post(self, hook: Hook, body: bytes) -> dict[str, Any]:
        client = self._client
        assert client is not None, "hooks configured: the client exists"
        headers = {"content-type": "application/json"}
        try:
            # httpx's timeout bounds each connect, write and read; the deadline, the whole call.
            async with asyncio.timeout(hook.timeout):
                response = await client.post(
                    hook.url, content=body, headers=headers, timeout=hook.timeout
                )
        except (TimeoutError, httpx.TimeoutException):
            raise HookFailed("timeout", f"no answer within {hook.timeout:g}s") from None
        except httpx.HTTPError as exc:
            raise HookFailed("unreachable", f"{type(exc).__name__}: {exc}"[:200]) from None
        if not 200 <= response.status_code < 300:
            raise HookFailed("bad_status", f"HTTP {response.status_code}")
        try:
            reply = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            raise HookFailed("bad_reply", "the reply is not JSON") from None
        if not isinstance(reply, dict):
            raise HookFailed("bad_reply", "the reply is not a JSON object")
        return reply

    def _observe(self, hook: Hook, started: float, outcome: str) -> None:
        self._seconds.labels(hook.name).observe(time.perf_counter() - started)
        self._outcomes.labels(hook.name, outcome).inc()
