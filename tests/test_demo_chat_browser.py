"""The moderated chat demo in a real browser: headless Chromium (the system's
``/usr/bin/chromium``, Playwright) against ``python -m gateway`` in dev mode, whose hooks
are the demo backend's (gateway.demo_backend).

- logging in with a name sets an HttpOnly session cookie and the page connects with no
  token at all: the connect hook knows the browser by its cookie;
- a message reaches a second browser with the id and time the backend gave it; one with
  a banned word is refused with a message the user sees, and nobody receives it;
- after a reload the page is straight back in (the cookie) with the messages, which it
  loaded over the ``chat.history`` rpc, never the gateway's ``history``; older ones come a
  page at a time from "Load older messages";
- with ``GATEWAY_HOOKS`` of the user's, the page falls back to a dev token.

Synchronisation is by polling with deadlines (``page.wait_for_function``).
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import orjson
import pytest
from websockets.asyncio.client import connect

from gateway.demo_backend import COOKIE, PAGE
from tests.browser_helpers import chromium, in_the_chat, join_chat
from tests.helpers import WsClient
from tests.procs import GatewayProcess

pytestmark = pytest.mark.timeout(90)

PageFactory = Callable[..., Awaitable[Any]]


@pytest.fixture
async def new_page() -> AsyncIterator[PageFactory]:
    """``await new_page()``: a page in a context of its own (its own cookies), whose
    WebSockets' URLs and sent frames are recorded on ``page.sockets`` / ``page.sent``.
    Uncaught page errors fail the test."""
    errors: list[str] = []
    async with chromium() as browser:

        async def make() -> Any:
            context = await browser.new_context(viewport={"width": 1100, "height": 720})
            page = await context.new_page()
            page.sockets, page.sent = [], []

            def opened(ws: Any) -> None:
                page.sockets.append(ws.url)
                ws.on("framesent", lambda payload: page.sent.append(payload))

            page.on("websocket", opened)
            page.on("pageerror", lambda exc: errors.append(f"{page.url}: {exc}"))
            return page

        yield make
    assert not errors, f"uncaught errors in the page: {errors}"


async def texts(page: Any) -> list[str]:
    found: list[str] = await page.eval_on_selector_all(
        "[data-testid=message-text]", "els => els.map((e) => e.textContent)"
    )
    return found


async def wait_texts(page: Any, expected: list[str]) -> None:
    await page.wait_for_function(
        "expected => JSON.stringify([...document.querySelectorAll('[data-testid=message-text]')]"
        ".map((e) => e.textContent)) === JSON.stringify(expected)",
        arg=expected,
        timeout=10_000,
    )


async def send(page: Any, text: str) -> None:
    await page.fill("[data-testid=input]", text)
    await page.click("[data-testid=send]")


def ops(page: Any, since: int = 0) -> list[dict[str, Any]]:
    """The commands the page sent over its WebSockets (from frame ``since`` on)."""
    return [orjson.loads(frame) for frame in page.sent[since:]]


async def test_cookie_login_moderated_publish_and_history_over_rpc_after_a_reload(
    new_page: PageFactory, dev_gateway: GatewayProcess
) -> None:
    room = secrets.token_hex(4)
    url = f"{dev_gateway.url}/chat?room={room}"
    alice, bob = await new_page(), await new_page()
    await join_chat(alice, url, "alice")
    await join_chat(bob, url, "bob")

    # Connected by the cookie alone: no token in any WebSocket URL, nor in a cookie the
    # page's scripts could read.
    for page in (alice, bob):
        assert page.sockets and all(u.endswith("/ws") for u in page.sockets), page.sockets
        cookies = {c["name"]: c for c in await page.context.cookies()}
        assert cookies[COOKIE]["httpOnly"] is True and cookies[COOKIE]["sameSite"] == "Lax"
        assert COOKIE not in await page.evaluate("document.cookie")
        assert "session cookie" in (await page.text_content("#whoami") or "")

    # A message reaches bob with the id and time the backend gave it.
    await send(alice, "hello bob")
    await wait_texts(bob, ["hello bob"])
    pushed = await bob.evaluate("window.chatEvents.filter((e) => e.data)")
    assert [p["data"]["user"] for p in pushed] == ["alice"]
    message = pushed[0]["data"]
    assert set(message) == {"id", "user", "text", "ts"}
    for page in (alice, bob):
        await wait_texts(page, ["hello bob"])
        assert await page.text_content("[data-testid=message-id]") == f"#{message['id']}"
        assert await page.get_attribute("[data-testid=message] time", "datetime")

    # A banned word: refused, the reason shown to alice, her text kept, nothing published.
    await send(alice, "well darn it")
    refusal = alice.locator("[data-testid=refusal]")
    await refusal.wait_for(state="visible", timeout=5_000)
    assert "please keep it civil" in (await refusal.text_content() or "")
    assert await alice.input_value("[data-testid=input]") == "well darn it"
    await send(alice, "sorry")
    await wait_texts(bob, ["hello bob", "sorry"])  # in order: "darn" never came before it
    await wait_texts(alice, ["hello bob", "sorry"])
    assert await bob.locator("[data-testid=refusal]").count() == 0

    # A reload: back in with the cookie, the messages from the backend over rpc.
    before = len(alice.sent)
    await alice.reload()
    await in_the_chat(alice, "alice")
    await wait_texts(alice, ["hello bob", "sorry"])
    sent = ops(alice, before)
    assert [c for c in sent if c["op"] == "rpc"] == [
        {
            "id": next(c["id"] for c in sent if c["op"] == "rpc"),
            "op": "rpc",
            "method": "chat.history",
            "data": {"room": room, "limit": PAGE},
        }
    ]
    assert not [c for c in ops(alice) if c["op"] == "history"]
    assert alice.sockets[-1].endswith("/ws")


async def test_older_messages_come_a_page_at_a_time_over_rpc(
    new_page: PageFactory, dev_gateway: GatewayProcess
) -> None:
    room = secrets.token_hex(4)
    count = PAGE + 5
    # Another client of the same backend: its session cookie, no token, over a WebSocket.
    async with httpx.AsyncClient(base_url=dev_gateway.url, trust_env=False) as http:
        cookie = (await http.post("/demo/login", json={"name": "dora"})).cookies[COOKIE]
    headers = {"Cookie": f"{COOKIE}={cookie}"}
    async with connect(f"{dev_gateway.ws_url}/ws", additional_headers=headers) as conn:
        ws = WsClient(conn)
        for i in range(count):
            await ws.publish(f"chat:demo-{room}", {"text": f"m{i}"})

    page = await new_page()
    await join_chat(page, f"{dev_gateway.url}/chat?room={room}", "carol")
    await wait_texts(page, [f"m{i}" for i in range(count - PAGE, count)])
    older = page.locator("[data-testid=older]")
    assert await older.is_visible()

    await older.click()
    await wait_texts(page, [f"m{i}" for i in range(count)])
    await older.wait_for(state="hidden", timeout=5_000)  # nothing older left
    ids = await page.eval_on_selector_all(
        "[data-testid=message]", "els => els.map((e) => Number(e.dataset.id))"
    )
    assert ids == sorted(ids) and len(set(ids)) == count
    rpcs = [c for c in ops(page) if c["op"] == "rpc"]
    assert [c["data"].get("before") for c in rpcs] == [None, ids[count - PAGE]]


async def test_with_the_users_own_hooks_the_page_connects_with_a_dev_token(
    new_page: PageFactory,
) -> None:
    """GATEWAY_HOOKS set by the user: no connect hook takes the demo's cookie, so the page
    uses a dev token and the gateway's own history, as before the demo backend."""
    gateway = GatewayProcess(env={"GATEWAY_HOOKS": "{}", "GATEWAY_LOG_LEVEL": "warning"})
    try:
        await gateway.wait_ready()
        url = f"{gateway.url}/chat?room={secrets.token_hex(4)}"
        alice = await new_page()
        await join_chat(alice, url, "alice")
        assert all("/ws?token=" in u for u in alice.sockets), alice.sockets
        await send(alice, "darn, no moderation here")  # no publish hook either
        await wait_texts(alice, ["darn, no moderation here"])
        assert await alice.locator("[data-testid=message-id]").count() == 0

        bob = await new_page()
        await join_chat(bob, url, "bob")
        await wait_texts(bob, ["darn, no moderation here"])  # from the gateway's history
        assert [c["op"] for c in ops(bob) if c["op"] in ("history", "rpc")] == ["history"]
    finally:
        gateway.stop()
