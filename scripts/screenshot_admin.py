"""Take docs/img/admin.png: the admin page with WebSocket and SSE clients on a few
channels and a backend publishing, after some seconds of samples. By default one dev-mode
gateway (its demo publisher running); with ``--redis URL`` two workers on that Redis (a
JWT secret and an admin token made up for the run), the clients spread over both.

    .venv/bin/python scripts/screenshot_admin.py [--redis redis://127.0.0.1:6379/0]
        [--seconds 40] [--out docs/img/admin.png]

Needs the test dependencies (playwright, websockets, httpx) and /usr/bin/chromium.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import secrets
import sys
from pathlib import Path

import httpx
import orjson
from websockets.asyncio.client import connect

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from auth.tokens import make_token  # noqa: E402
from tests.browser_helpers import chromium  # noqa: E402
from tests.procs import GatewayProcess  # noqa: E402

CHANNELS = {"prices:us": 9, "chat:lobby": 6, "chat:support": 3, "prices:eu": 4, "news": 2}


async def websocket_client(url: str, channels: list[str], stop: asyncio.Event) -> None:
    async with connect(url, proxy=None) as ws:
        for n, channel in enumerate(channels, 1):
            await ws.send(orjson.dumps({"id": n, "op": "subscribe", "channel": channel}).decode())
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ws.recv(), 0.5)


async def sse_client(http: httpx.AsyncClient, channel: str, tok: str, stop: asyncio.Event) -> None:
    params = {"channel": channel, "token": tok}
    async with http.stream("GET", "/sse", params=params, timeout=None) as response:
        async for _ in response.aiter_lines():
            if stop.is_set():
                return


async def publisher(http: httpx.AsyncClient, tok: str, stop: asyncio.Event) -> None:
    n = 0
    while not stop.is_set():
        channel = random.choice(["chat:lobby", "prices:eu", "prices:us", "news", "chat:support"])
        await http.post(
            "/api/publish",
            json={"channel": channel, "data": {"n": n}},
            headers={"Authorization": f"Bearer {tok}"},
        )
        n += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), random.uniform(0.02, 0.3))


async def main(seconds: float, out: Path, redis: str | None) -> None:
    env = {"GATEWAY_LOG_LEVEL": "warning", "GATEWAY_ACCESS_LOG": "false"}
    secret = admin = None
    if redis:
        secret, admin = secrets.token_hex(32), secrets.token_hex(16)
        env.update(
            GATEWAY_BROKER_URL=redis,
            GATEWAY_BROKER_PREFIX=f"screenshot-{secrets.token_hex(4)}",
            GATEWAY_JWT_SECRET=secret,
            GATEWAY_ADMIN_TOKEN=admin,
        )
    gateways = [GatewayProcess(env=env) for _ in range(2 if redis else 1)]
    stop = asyncio.Event()
    try:
        for gateway in gateways:
            await gateway.wait_ready()
        first = gateways[0]
        async with contextlib.AsyncExitStack() as stack:
            https = [
                await stack.enter_async_context(httpx.AsyncClient(base_url=g.url, trust_env=False))
                for g in gateways
            ]
            if secret:
                tok = make_token(secret, "screenshot", subscribe=["*"], publish=["*"])
            else:
                r = await https[0].get("/dev/token", params={"user": "screenshot"})
                tok = r.json()["token"]
            tasks = []
            n = 0
            for channel, count in CHANNELS.items():
                for i in range(count):
                    n += 1
                    gateway, http = gateways[n % len(gateways)], https[n % len(gateways)]
                    if i % 3 == 2:
                        tasks.append(asyncio.create_task(sse_client(http, channel, tok, stop)))
                    else:
                        extra = ["news"] if i % 4 == 0 and channel != "news" else []
                        url = f"{gateway.ws_url}/ws?token={tok}"
                        tasks.append(
                            asyncio.create_task(websocket_client(url, [channel, *extra], stop))
                        )
            tasks += [asyncio.create_task(publisher(http, tok, stop)) for http in https]
            async with chromium() as browser:
                page = await browser.new_page(viewport={"width": 1280, "height": 1000})
                if admin:  # as the page's sign-in form keeps it
                    await page.add_init_script(
                        f"sessionStorage.setItem('gatewayAdminToken', '{admin}')"
                    )
                await page.goto(f"{first.url}/admin?interval=1000")
                await page.wait_for_function(
                    "document.querySelectorAll('[data-testid=channel-row]').length >= 5"
                )
                await page.click("[data-testid=channel-row][data-channel='chat:lobby']")
                await page.click("[data-testid=publish-send]")
                await page.wait_for_selector("[data-testid=history-entry]")
                await asyncio.sleep(seconds)  # let the charts fill
                await page.click("[data-testid=history-load]")
                await page.wait_for_selector("[data-testid=history-entry]")
                await page.screenshot(path=str(out), full_page=True)
            stop.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for gateway in gateways:
            gateway.stop()
    print(f"wrote {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--redis", help="two workers on this Redis (default: one, memory)")
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "admin.png")
    args = parser.parse_args()
    asyncio.run(main(args.seconds, args.out, args.redis))
