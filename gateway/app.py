"""The app factory and its lifespan: the gateway's own routes, then the features (the LLM
streams, the demo), each of which installs itself."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from gateway import admin, api, demo, llm, ops, sse_open, sse_opener, sse_route, ws, ws_route
from gateway.cors import CorsHeaders, HTTPOnlyCORSMiddleware
from gateway.errors import HTTP_STATUS, ErrorCode, GatewayError, JSONBody
from gateway.logs import install_redaction
from gateway.runtime import Gateway
from gateway.server.draining import DRAIN
from gateway.server.headwait import HEAD_DEADLINES, HeadDeadlines
from gateway.server.ports import OPEN_STREAM, OPEN_WEBSOCKET
from gateway.settings import Settings

logger = logging.getLogger(__name__)
STATUS_CODES = {status: code for code, status in HTTP_STATUS.items() if code != "limit_exceeded"}


def error_response(
    code: ErrorCode,
    message: str,
    status: int | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONBody:
    return JSONBody(
        {"error": {"code": str(code), "message": message}},
        status_code=status or HTTP_STATUS[code],
        headers=headers,
    )


async def _gateway_error(request: Request, exc: Exception) -> JSONBody:
    assert isinstance(exc, GatewayError)
    return error_response(exc.code, exc.message, exc.status, exc.headers)  # (a 429's Retry-After)


async def _validation_error(request: Request, exc: Exception) -> JSONBody:
    assert isinstance(exc, RequestValidationError)
    problems = "; ".join(
        f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg')}" for err in exc.errors()
    )
    return error_response(ErrorCode.BAD_REQUEST, problems or "bad request")


async def _http_error(request: Request, exc: Exception) -> JSONBody:
    assert isinstance(exc, HTTPException)
    status = exc.status_code
    code = STATUS_CODES.get(status, ErrorCode.INTERNAL if status >= 500 else ErrorCode.BAD_REQUEST)
    return error_response(code, str(exc.detail), status, exc.headers)  # (a 405's Allow)


async def _client_gone(request: Request, exc: Exception) -> JSONBody:
    """A client that left while its body was read (a publish cut mid-body): nobody reads
    this answer, and it is no error of the server's (it was one, with a traceback, per
    such client: a log anyone could fill)."""
    assert isinstance(exc, ClientDisconnect)
    return error_response(ErrorCode.BAD_REQUEST, "the client left before its body was in")


class GatewayApp(FastAPI):
    """FastAPI, with the gateway's shortcut for opening SSE streams in front of it
    (``sse_open.Shortcut``). (``async``, so that servers detect an ASGI 3 app.)"""

    sse_shortcut: sse_open.Shortcut | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        shortcut = self.sse_shortcut
        if shortcut is not None:
            opened = shortcut.take(scope, receive, send)
            if opened is not None:
                return await opened
        return await super().__call__(scope, receive, send)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    install_redaction()
    gateway = Gateway(settings)
    if gateway.metrics.shared is not None:  # --workers N: its figures for the others
        gateway.add_feature(gateway.metrics.shared)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        await gateway.start()
        deadlines = None
        try:
            # For the server: the drain, to run when it starts shutting down, before it
            # closes any connection (gateway.server.draining); under the gateway's own
            # protocols, the openers and the request heads' deadlines.
            state: dict[str, Any] = {DRAIN: gateway.drain}
            if settings.raw_writes:  # /ws and /sse below ASGI, under the gateway's protocols
                state[OPEN_WEBSOCKET] = ws.opener(gateway)
                state[OPEN_STREAM] = sse_opener.opener(gateway, cors_headers)
                loop = asyncio.get_running_loop()
                deadlines = HeadDeadlines(loop, settings.request_head_timeout)
                state[HEAD_DEADLINES] = deadlines
            yield state
        finally:
            if deadlines is not None:
                deadlines.close()
            # Shutdown, in order: the drain (not ready, sessions closed with 1012 / end of
            # stream, a bounded wait: a no-op when the server ran it already), then the
            # features and the broker.
            await gateway.drain()
            await gateway.close()

    app = GatewayApp(
        title="Streaming gateway",
        version="0.1.0",
        lifespan=lifespan,
        # FastAPI's pages load Swagger's script from a CDN onto the gateway's origin:
        # while developing only.
        docs_url=None if settings.env == "production" else "/docs",
        openapi_url=None if settings.env == "production" else "/openapi.json",
        redoc_url=None,
    )
    app.state.gateway = gateway
    app.add_exception_handler(GatewayError, _gateway_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(ClientDisconnect, _client_gone)
    cors: dict[str, Any] = {
        "allow_origins": settings.origins,
        "allow_methods": ["GET", "POST", "DELETE", "OPTIONS"],
        # Cache-Control and X-Requested-With: what EventSource polyfills send with a stream.
        "allow_headers": [
            "Authorization",
            "Content-Type",
            "Last-Event-ID",
            "Cache-Control",
            "X-Requested-With",
        ],
        "max_age": 600,
        # Cookie authentication (a connect hook) from pages of the origins listed, never
        # from any origin: with "*" a cross-origin request's cookies are not honoured.
        "allow_credentials": "connect" in gateway.hooks.hooks and "*" not in settings.origins,
    }
    if "connect" in gateway.hooks.hooks and "*" in settings.origins:
        logger.warning(
            "a connect hook with GATEWAY_ALLOWED_ORIGINS=*: a browser sends its cookies with "
            "a WebSocket handshake from any page, so a cookie-authenticating hook must check "
            "`origin` itself, or set GATEWAY_ALLOWED_ORIGINS to your pages' origins"
        )
    app.add_middleware(HTTPOnlyCORSMiddleware, **cors)
    app.sse_shortcut = sse_open.Shortcut(
        gateway, lambda inner: HTTPOnlyCORSMiddleware(inner, **cors)
    )
    cors_headers = CorsHeaders(HTTPOnlyCORSMiddleware(app, **cors))
    app.include_router(ws_route.router)
    app.include_router(sse_route.router)
    app.include_router(api.router)
    app.include_router(ops.router)
    llm.install(app, gateway)
    demo.install(app, gateway)
    admin.install(app, gateway)
    return app
