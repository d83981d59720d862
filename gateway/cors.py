"""CORS for the gateway's HTTP routes, and the same headers for responses answered
without the framework.

``HTTPOnlyCORSMiddleware`` is Starlette's middleware, for HTTP scopes only. Streams that
the gateway's own server protocol opens below ASGI (``gateway.sse_opener.opener``) never pass
through it, yet must carry the very headers it would add: ``CorsHeaders`` asks the
middleware itself (its ``send`` on a start message), once per origin.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.types import Message, Receive, Scope, Send

Header = tuple[bytes, bytes]
CLIENT_SCRIPTS = frozenset({"/client.js", "/client.mjs"})


def cors_path(path: str) -> bool:
    """Whether CORS answers requests for ``path``: the contract's ``/sse`` and HTTP API,
    and the client script (a page of another origin loads it as a module, which is a
    CORS request). Not the pages, the admin view or dev mode's token route
    (``gateway.dev_guard``)."""
    return path == "/sse" or path.startswith("/api/") or path in CLIENT_SCRIPTS


class HTTPOnlyCORSMiddleware(CORSMiddleware):
    """CORS concerns HTTP only, and the paths of ``cors_path``. A WebSocket scope is
    handed on as a tail call (this ``__call__`` is not ``async``), so a connection does
    not keep one more coroutine frame parked here for its whole life."""

    def __call__(  # type: ignore[override]
        self, scope: Scope, receive: Receive, send: Send
    ) -> Awaitable[None]:
        if scope["type"] != "http" or not cors_path(scope["path"]):
            return self.app(scope, receive, send)
        return super().__call__(scope, receive, send)


class CorsHeaders:
    """What ``middleware`` adds to a simple (not preflight) response's headers, by origin.

    Origins are the client's to choose, so the cache is bounded: when full it starts
    over. The middleware's ``send`` awaits nothing but the ``send`` it is given, so it
    runs to its end at the first step; anything else is a bug, not a wait.
    """

    LIMIT = 256

    def __init__(self, middleware: CORSMiddleware) -> None:
        self._middleware = middleware
        self._added: dict[str | None, list[Header]] = {}

    def headers(self, headers: list[Header], origin: str | None) -> list[Header]:
        """``headers`` with what the middleware adds for ``origin`` (None: no Origin)."""
        added = self._added.get(origin)
        if added is None:
            if len(self._added) >= self.LIMIT:
                self._added.clear()
            added = self._added[origin] = self._ask(origin)
        return headers + added

    def _ask(self, origin: str | None) -> list[Header]:
        """The headers the middleware appends to an empty start message."""
        sent: list[Message] = []

        async def capture(message: Message) -> None:
            sent.append(message)

        sent_origin = [] if origin is None else [(b"origin", origin.encode("latin-1"))]
        request: dict[str, Any] = {"headers": sent_origin}
        start: Message = {"type": "http.response.start", "status": 200, "headers": []}
        step = self._middleware.send(start, send=capture, request_headers=Headers(scope=request))
        try:
            step.send(None)
        except StopIteration:
            pass
        else:  # pragma: no cover - Starlette's send awaited something else
            step.close()
            raise RuntimeError("the CORS middleware's send did not finish at once")
        return list(sent[0]["headers"])
