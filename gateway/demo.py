"""Demo pages and, in dev mode only, a demo publisher, a dev token endpoint and the chat
demo's backend (gateway.demo_backend). ``install`` adds them to an app."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from importlib import resources
from typing import Any

import orjson
from fastapi import APIRouter, Depends, FastAPI, Query
from fastapi.responses import HTMLResponse, Response

from auth.tokens import make_token
from channels.broker import BrokerUnavailable
from gateway import demo_backend
from gateway.deps import GatewayDep
from gateway.dev_guard import PAGE_HEADERS, PageFiles, dev_request
from gateway.errors import ErrorCode, GatewayError
from gateway.runtime import Gateway

logger = logging.getLogger(__name__)
router = APIRouter(include_in_schema=False)
STATIC = resources.files("gateway") / "static"
SYMBOLS = {"ACME": 101.0, "GLOBEX": 55.0, "INITECH": 12.5, "UMBRELLA": 230.0}


def install(app: FastAPI, gateway: Gateway) -> None:
    """The pages and the client script; in dev mode with ``GATEWAY_DEMO`` the publisher and
    the chat's backend."""
    app.include_router(router)
    app.mount("/static", PageFiles(directory=str(STATIC)), name="static")
    if gateway.dev_secret is not None and gateway.settings.demo:
        gateway.add_feature(DemoPublisher(gateway))
        demo_backend.install(app, gateway)


def _page(name: str) -> HTMLResponse:
    return HTMLResponse((STATIC / name).read_text(encoding="utf-8"), headers=PAGE_HEADERS)


# The JavaScript client: one source, served as a classic script (``window.GatewayClient``)
# and as an ES module (the same text followed by its exports). See docs/client.md.
JAVASCRIPT = "text/javascript; charset=utf-8"
MODULE_EXPORTS = "\nexport { GatewayClient };\nexport default GatewayClient;\n"


def _script(text: str) -> Response:
    return Response(text, media_type=JAVASCRIPT, headers={"Cache-Control": "no-cache"})


@router.get("/client.js")
async def client_script() -> Response:
    return _script((STATIC / "client.js").read_text(encoding="utf-8"))


@router.get("/client.mjs")
async def client_module() -> Response:
    return _script((STATIC / "client.js").read_text(encoding="utf-8") + MODULE_EXPORTS)


@router.get("/")
async def dashboard() -> HTMLResponse:
    return _page("index.html")


@router.get("/chat")
async def chat() -> HTMLResponse:
    return _page("chat.html")


@router.get("/llm")
async def llm() -> HTMLResponse:
    return _page("llm.html")


@router.get("/dev/token", dependencies=[Depends(dev_request)])
async def dev_token(
    gateway: GatewayDep, user: str = Query("guest", min_length=1, max_length=64)
) -> dict[str, Any]:
    """Dev mode only: a token for ``user`` that may subscribe and publish anywhere."""
    if gateway.dev_secret is None:
        raise GatewayError(ErrorCode.NOT_FOUND, "dev tokens exist only in dev mode")
    token = make_token(gateway.dev_secret, user, subscribe=["*"], publish=["*"], ttl=3600)
    return {"token": token, "user": user}


async def run_demo_publisher(gateway: Gateway, interval: float = 0.25) -> None:
    """Random-walk prices on ``demo:ticker`` and a stats line on ``demo:stats`` every second."""
    prices = dict(SYMBOLS)
    started = time.monotonic()
    ticks = 0
    while True:
        await asyncio.sleep(interval)
        symbol = random.choice(list(prices))
        prices[symbol] = round(max(1.0, prices[symbol] * (1 + random.gauss(0, 0.004))), 2)
        payload = {"symbol": symbol, "price": prices[symbol], "ts": time.time()}
        try:
            await gateway.hub.publish("demo:ticker", orjson.dumps(payload))
            ticks += 1
            if ticks % max(1, round(1 / interval)) == 0:
                stats = {
                    "connections": gateway.connections.total,
                    "publications": gateway.hub.stats.publications_in,
                    "uptime": round(time.monotonic() - started, 1),
                }
                await gateway.hub.publish("demo:stats", orjson.dumps(stats))
        except BrokerUnavailable:
            logger.debug("demo publisher: broker unavailable")


class DemoPublisher:
    """``run_demo_publisher`` as a task that starts and stops with the gateway."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.task = asyncio.create_task(run_demo_publisher(self.gateway), name="demo")
        self.task.add_done_callback(_log_crash)

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("demo publisher crashed", exc_info=task.exception())
