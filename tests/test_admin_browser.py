"""The admin page in headless Chromium (``tests.browser_helpers.chromium``), against a
running gateway with clients connected: it asks for the admin token, shows the
connections and the channels, and publishes from its form into a channel whose history
it then shows. Synchronisation by Playwright's waits, never sleeps."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from tests.browser_helpers import chromium
from tests.conftest import RunningServer, token
from tests.helpers import api_client, open_sse, ws_client

pytestmark = pytest.mark.timeout(90)

ADMIN = "admin-" + secrets.token_hex(12)


@pytest.fixture
async def page() -> AsyncIterator[Any]:
    """A fresh page; uncaught errors in it fail the test."""
    errors: list[str] = []
    async with chromium() as browser:
        context = await browser.new_context(viewport={"width": 1280, "height": 900})
        tab = await context.new_page()
        tab.on("pageerror", lambda exc: errors.append(str(exc)))
        yield tab
        await context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


async def text_is(page: Any, testid: str, expected: str, timeout: float = 10_000) -> None:
    await page.wait_for_function(
        "([id, want]) => document.querySelector(`[data-testid=${id}]`).textContent === want",
        arg=[testid, expected],
        timeout=timeout,
    )


async def test_admin_page_shows_live_figures_and_publishes_into_history(
    make_server: Callable[..., Awaitable[RunningServer]], page: Any
) -> None:
    server = await make_server(admin_token=ADMIN)
    room = f"chat:{secrets.token_hex(4)}"
    async with (
        api_client(server) as http,
        ws_client(server, token("alice")) as alice,
        ws_client(server, token("bob")) as bob,
        open_sse(http, [room]) as sse,
    ):
        await sse.event()
        await alice.subscribe(room)
        await bob.subscribe(room)
        await bob.subscribe("news")

        # Without the token the page only asks for it; a wrong one is refused.
        await page.goto(f"{server.url}/admin?interval=300")
        await page.wait_for_selector("[data-testid=login]", state="visible")
        await page.fill("[data-testid=admin-token]", "not-the-admin-token")
        await page.click("[data-testid=admin-login]")
        await page.wait_for_selector("text=wrong token")
        assert await page.text_content("[data-testid=connections-total]") == "\u2013"  # no figures
        await page.fill("[data-testid=admin-token]", ADMIN)
        await page.click("[data-testid=admin-login]")

        # The figures: 2 WebSockets and 1 SSE stream, the room's 3 subscribers first.
        await text_is(page, "connections-total", "3")
        assert await page.text_content("[data-testid=connections-websocket]") == "2"
        assert await page.text_content("[data-testid=connections-sse]") == "1"
        assert await page.text_content("[data-testid=subscriptions]") == "4"
        assert await page.get_attribute("[data-testid=status]", "data-state") == "live"
        assert await page.text_content("[data-testid=broker-state]") == "ready"
        rows = await page.eval_on_selector_all(
            "[data-testid=channel-row]",
            "rows => rows.map((r) => [r.dataset.channel, "
            "r.querySelector('[data-testid=channel-subscribers]').textContent])",
        )
        assert rows == [[room, "3"], ["news", "1"]]
        assert await page.locator("[data-testid=worker-row]").count() == 1
        # A client leaving shows within a refresh.
        await bob.conn.close()
        await text_is(page, "connections-total", "2")
        # The charts: a line once there are two samples.
        await page.wait_for_selector("#chart-connections polyline", state="attached")

        # Clicking the channel's row picks it (once bob has left its presence too); publish
        # from the form, see it in history.
        async def bob_left() -> bool:
            r = await http.get(
                f"/admin/api/channels/{room}/presence", headers={"Authorization": f"Bearer {ADMIN}"}
            )
            return "bob" not in {c["user"] for c in r.json()["clients"]}

        deadline = time.monotonic() + 5
        while not await bob_left():
            assert time.monotonic() < deadline, "bob still in presence"
            await asyncio.sleep(0.05)
        await page.click(f"[data-testid=channel-row][data-channel='{room}']")
        assert await page.input_value("[data-testid=channel-input]") == room
        await page.wait_for_selector("text=Presence in", timeout=5_000)
        users = await page.eval_on_selector_all(
            "[data-testid=presence-entry]", "els => els.map((e) => e.textContent.split(' ')[0])"
        )
        assert sorted(users) == ["alice", "sse-user"]
        text = f"hello {secrets.token_hex(3)}"
        await page.fill("[data-testid=publish-data]", f'{{"text": "{text}"}}')
        await page.click("[data-testid=publish-send]")
        await text_is(page, "publish-result", "published: offset 1")
        await page.wait_for_function(
            "text => [...document.querySelectorAll('[data-testid=history-entry]')]"
            ".some((e) => e.textContent.includes(text))",
            arg=text,
            timeout=5_000,
        )
        [push] = await alice.publications(room, 1)
        assert push["data"] == {"text": text}
        # And the publication counts in the figures.
        await text_is(page, "publications", "1")
