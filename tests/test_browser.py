"""End to end in a real browser: headless Chromium (the system's ``/usr/bin/chromium``)
driven by Playwright's async API, against real ``python -m gateway`` processes.

- the dashboard shows live updates from the dev-mode demo publisher;
- two chat pages see each other's messages, joins and leaves;
- the JavaScript client (``/client.mjs``) rides out a gateway restart (Redis keeps history)
  while a backend keeps publishing, and ends with every offset exactly once, in order;
- a plain EventSource page resumes after a restart with ``Last-Event-ID``, nothing lost;
- the client falls back to SSE (+ HTTP publish) when WebSockets are blocked, and refreshes
  its token through ``getToken()`` before it expires (or after a 4001).

Chromium missing is a failure that says ``apt-get install chromium``, never a skip.
Synchronisation is by polling with deadlines (``page.wait_for_function``, ``eventually``).
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest

from tests.browser_helpers import Publisher, RestartableGateway, chromium, join_chat
from tests.conftest import SECRET, eventually, free_port, token
from tests.helpers import api_publish, freezing_proxy, silent_server
from tests.procs import GatewayProcess

pytestmark = pytest.mark.timeout(90)

PageFactory = Callable[..., Awaitable[Any]]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    async with chromium() as b:
        yield b


@pytest.fixture
async def new_page(browser: Any) -> AsyncIterator[PageFactory]:
    """``await new_page(url)``: a page in its own context (own cookies and storage).
    Uncaught page errors fail the test."""
    contexts: list[Any] = []
    errors: list[str] = []

    async def make(url: str | None = None, **context_options: Any) -> Any:
        context = await browser.new_context(**context_options)
        contexts.append(context)
        page = await context.new_page()
        page.on("pageerror", lambda exc: errors.append(f"{page.url}: {exc}"))
        if url is not None:
            await page.goto(url)
        return page

    yield make
    for context in contexts:
        await context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


@pytest.fixture
async def redis_gateways(
    redis_server: Any, redis_prefix: str
) -> AsyncIterator[tuple[RestartableGateway, RestartableGateway]]:
    """Two gateways on one Redis: ``a`` (the page's, restarted on its port) and ``b`` (the
    backend's, up all the time, so publications go on while ``a`` is down)."""
    env = {
        "GATEWAY_BROKER_URL": redis_server.url,
        "GATEWAY_BROKER_PREFIX": redis_prefix,
        "GATEWAY_JWT_SECRET": SECRET,
        "GATEWAY_DRAIN_SECONDS": "3",
        # Room for everything published while a gateway restarts (~50/s for a few seconds).
        "GATEWAY_HISTORY_SIZE": "2000",
        "GATEWAY_SSE_RETRY_MS": "300",
        "GATEWAY_LOG_LEVEL": "warning",
    }
    a, b = RestartableGateway(env).start(), RestartableGateway(env).start()
    try:
        await asyncio.gather(a.wait_ready(), b.wait_ready())
        yield a, b
    finally:
        a.close()
        b.close()


def unique_channel(prefix: str = "e2e") -> str:
    return f"{prefix}:{secrets.token_hex(5)}"


async def received_up_to(page: Any, last: int, timeout: float = 15_000) -> list[dict[str, Any]]:
    """Wait until the page has received offset ``last``; return what it received."""
    await page.wait_for_function(
        "last => window.received.length > 0 && "
        "window.received[window.received.length - 1].offset >= last",
        arg=last,
        timeout=timeout,
    )
    received: list[dict[str, Any]] = await page.evaluate("window.received")
    return received


# --------------------------------------------------------------------------- demo pages


async def test_dashboard_shows_live_updates(
    new_page: PageFactory, dev_gateway: GatewayProcess
) -> None:
    page = await new_page(dev_gateway.url + "/")
    # The demo publisher: demo:ticker every 250 ms, demo:stats every second.
    await page.wait_for_function(
        "document.querySelector('[data-testid=state]').dataset.state === 'connected' && "
        "Number(document.querySelector('[data-testid=received-count]').textContent) >= 8",
        timeout=10_000,
    )
    first = int(await page.text_content("[data-testid=last-offset]") or 0)
    await page.wait_for_function(
        "first => Number(document.querySelector('[data-testid=last-offset]').textContent) "
        ">= first + 4",
        arg=first,
        timeout=5_000,
    )
    await page.wait_for_function(
        "window.received.some((p) => p.channel === 'demo:stats')", timeout=5_000
    )
    ticker = [p for p in await page.evaluate("window.received") if p["channel"] == "demo:ticker"]
    offsets = [p["offset"] for p in ticker]
    assert offsets == list(range(offsets[0], offsets[0] + len(offsets)))  # in order, none twice
    assert await page.text_content("[data-testid=transport]") == "WebSocket"
    assert await page.text_content("[data-testid=state]") == "live"
    # A note posted on one dashboard (publish over the socket) shows on another.
    other = await new_page(dev_gateway.url + "/")
    await other.wait_for_function(
        "document.querySelector('[data-testid=state]').dataset.state === 'connected'",
        timeout=10_000,
    )
    text = f"note {secrets.token_hex(3)}"
    await page.fill("[data-testid=note-input]", text)
    await page.click("[data-testid=note-send]")
    await other.wait_for_function(
        "text => [...document.querySelectorAll('[data-testid=note]')].some((n) => "
        "n.textContent.includes(text))",
        arg=text,
        timeout=5_000,
    )


async def presence_events(page: Any, event: str, user: str, count: int = 1) -> None:
    """Wait for ``count`` ``event`` pushes (join/leave) of ``user`` in window.chatEvents."""
    await page.wait_for_function(
        "([event, user, count]) => window.chatEvents.filter((e) => e.event === event && "
        "e.client.user === user).length >= count",
        arg=[event, user, count],
        timeout=10_000,
    )


async def online(page: Any) -> list[str]:
    users: list[str] = await page.eval_on_selector_all(
        "[data-testid=online-user]", "els => els.map((e) => e.textContent)"
    )
    return sorted(users)


async def test_two_chat_pages_talk_and_see_each_others_join_and_leave(
    new_page: PageFactory, dev_gateway: GatewayProcess
) -> None:
    url = f"{dev_gateway.url}/chat?room={secrets.token_hex(4)}"
    alice, bob = await new_page(), await new_page()
    await join_chat(alice, url, "alice")
    await join_chat(bob, url, "bob")
    await presence_events(alice, "join", "bob")
    assert await online(alice) == await online(bob) == ["alice", "bob"]

    async def say(sender: Any, text: str, receiver: Any) -> None:
        await sender.fill("[data-testid=input]", text)
        await sender.click("[data-testid=send]")
        await receiver.wait_for_function(
            "text => [...document.querySelectorAll('[data-testid=message]')].some((m) => "
            "m.textContent.includes(text))",
            arg=text,
            timeout=5_000,
        )

    await say(alice, "hi bob", bob)
    await say(bob, "hi alice, how are you?", alice)
    for page in (alice, bob):
        texts = await page.eval_on_selector_all(
            "[data-testid=message-text]", "els => els.map((e) => e.textContent)"
        )
        assert texts == ["hi bob", "hi alice, how are you?"]

    # alice leaves (unsubscribe by disconnecting) and comes back: bob sees both.
    await alice.click("[data-testid=leave]")
    await presence_events(bob, "leave", "alice")
    await bob.wait_for_function(
        "[...document.querySelectorAll('[data-testid=system]')].some((l) => "
        "l.textContent === 'alice left')",
        timeout=5_000,
    )
    assert await online(bob) == ["bob"]
    await alice.click("[data-testid=join]")
    await presence_events(bob, "join", "alice")
    await alice.wait_for_function(
        "document.querySelectorAll('[data-testid=message]').length === 2", timeout=5_000
    )  # history again on the new join
    assert await online(bob) == ["alice", "bob"]

    # bob closes his tab: alice sees him leave.
    await bob.close()
    await presence_events(alice, "leave", "bob")
    await alice.wait_for_function(
        "[...document.querySelectorAll('[data-testid=system]')].some((l) => "
        "l.textContent === 'bob left')",
        timeout=5_000,
    )
    assert await online(alice) == ["alice"]


# --------------------------------------------------------------------------- restarts


async def test_client_rides_out_a_gateway_restart_with_every_offset_once(
    new_page: PageFactory, redis_gateways: tuple[RestartableGateway, RestartableGateway]
) -> None:
    a, b = redis_gateways
    channel = unique_channel()
    page = await new_page(
        f"{a.url}/static/test-client.html?module=1&channel={channel}&token={token('viewer')}"
    )
    await page.wait_for_function(
        "window.subscribed === true && window.client.state === 'connected'", timeout=10_000
    )
    # The ES module form: the class is imported, not left on window.
    assert await page.evaluate("[window.form, window.globalAfterLoad]") == ["module", "undefined"]

    publisher = Publisher(b.url, channel, token("backend")).start()
    try:
        await page.wait_for_function("window.received.length >= 10", timeout=10_000)
        await a.stop(graceful=True)  # WebSockets closed with 1012 "service restart"
        await page.wait_for_function("window.client.state !== 'connected'", timeout=5_000)
        # Publications go on (through b) while the page's gateway is down.
        down = len(publisher.offsets)
        await eventually(lambda: len(publisher.offsets) >= down + 15, timeout=10)
        a.start()
        await a.wait_ready()
        await page.wait_for_function(
            "window.client.state === 'connected' && "
            "window.states.filter((s) => s === 'connected').length >= 2",
            timeout=15_000,
        )
        up = len(publisher.offsets)
        await eventually(lambda: len(publisher.offsets) >= up + 15, timeout=10)
    finally:
        offsets = await publisher.stop()
    last = offsets[-1]

    received = await received_up_to(page, last)
    assert [r["offset"] for r in received] == list(range(1, last + 1))
    assert [r["data"]["n"] for r in received] == list(range(len(received)))
    assert len({r["epoch"] for r in received}) == 1

    events = await page.evaluate("window.events")
    states = await page.evaluate("window.states")
    assert "reconnecting" in states, states
    resubscribed = [e for e in events if e["type"] == "subscribed" and e["resubscribed"]]
    assert resubscribed and all(e["recovered"] is True for e in resubscribed), events
    assert not [e for e in events if e["type"] == "recoveryFailed"], events


async def test_event_source_page_resumes_after_a_restart_with_last_event_id(
    new_page: PageFactory, redis_gateways: tuple[RestartableGateway, RestartableGateway]
) -> None:
    a, b = redis_gateways
    channel = unique_channel()
    page = await new_page(f"{a.url}/static/test-sse.html?channel={channel}&token={token('viewer')}")
    await page.wait_for_function("window.opens === 1", timeout=10_000)

    publisher = Publisher(b.url, channel, token("backend")).start()
    try:
        await page.wait_for_function("window.received.length >= 10", timeout=10_000)
        await a.stop(graceful=False)  # killed: the stream just drops
        await page.wait_for_function("window.errors >= 1", timeout=5_000)
        down = len(publisher.offsets)
        await eventually(lambda: len(publisher.offsets) >= down + 15, timeout=10)
        a.start()
        await a.wait_ready()
        # The browser reconnects by itself, sending the last id it saw as Last-Event-ID.
        await page.wait_for_function("window.opens >= 2", timeout=15_000)
        up = len(publisher.offsets)
        await eventually(lambda: len(publisher.offsets) >= up + 15, timeout=10)
    finally:
        offsets = await publisher.stop()
    last = offsets[-1]

    received = await received_up_to(page, last)
    assert [r["offset"] for r in received] == list(range(1, last + 1))
    assert [r["data"]["n"] for r in received] == list(range(len(received)))
    assert await page.evaluate("window.gaps") == []
    assert await page.evaluate("window.es.readyState") == 1  # OPEN: never gave up


async def test_client_js_and_module_are_served_as_javascript(
    dev_gateway: GatewayProcess,
) -> None:
    async with httpx.AsyncClient(base_url=dev_gateway.url, trust_env=False) as http:
        classic = await http.get("/client.js")
        module = await http.get("/client.mjs")
    for r in (classic, module):
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/javascript")
    assert "var GatewayClient" in classic.text and "\nexport " not in classic.text
    assert module.text.startswith(classic.text)
    assert module.text.rstrip().endswith("export default GatewayClient;")


# --------------------------------------------------------------------------- the client


BLOCK_WEBSOCKETS = """
// As behind a proxy that refuses upgrades: every handshake fails, nothing ever opens.
window.blockedWebSockets = 0;
window.WebSocket = class BlockedWebSocket {
  constructor(url) {
    this.url = url;
    this.readyState = 0;
    window.blockedWebSockets += 1;
    setTimeout(() => {
      this.readyState = 3;
      if (this.onerror) this.onerror(new Event('error'));
      if (this.onclose) this.onclose(new CloseEvent('close', { code: 1006, wasClean: false }));
    }, 5);
  }
  send() { throw new DOMException('not open', 'InvalidStateError'); }
  close() {}
};
"""


@pytest.mark.parametrize("reader", ["fetch", "EventSource"])
async def test_client_falls_back_to_sse_and_publishes_over_http_when_websockets_are_blocked(
    make_server: Callable[..., Awaitable[Any]], new_page: PageFactory, reader: str
) -> None:
    """Over fetch() (the default where it streams) and over the browser's EventSource."""
    server = await make_server()
    room, feed = unique_channel("chat"), unique_channel("feed")
    page = await new_page()
    await page.add_init_script(BLOCK_WEBSOCKETS)
    native = "&nativeSse=1" if reader == "EventSource" else ""
    await page.goto(
        f"{server.url}/static/test-client.html?channel={room}&token={token('viewer')}{native}"
    )
    await page.wait_for_function(
        "window.subscribed === true && window.client.transport === 'sse'", timeout=15_000
    )
    assert await page.evaluate("window.blockedWebSockets") == 3  # wsFailuresBeforeSse
    assert [e["type"] for e in await page.evaluate("window.events")].count("transport") == 1

    # Publish from the page (POST /api/publish with the token), presence and history (HTTP).
    result = await page.evaluate(f"window.client.publish('{room}', {{text: 'hello'}})")
    assert result["offset"] == 1
    presence = await page.evaluate(f"window.client.presence('{room}')")
    assert [c["user"] for c in presence["clients"]] == ["viewer"]
    async with httpx.AsyncClient(base_url=server.url, trust_env=False) as http:
        r = await http.post(
            "/api/publish",
            json={"channel": room, "data": {"text": "from the backend"}},
            headers={"Authorization": f"Bearer {token('backend')}"},
        )
        assert r.status_code == 200
        received = await received_up_to(page, 2)
        assert [(p["offset"], p["data"]["text"]) for p in received] == [
            (1, "hello"),
            (2, "from the backend"),
        ]
        history = await page.evaluate(f"window.client.history('{room}', {{limit: 1}})")
        assert [p["offset"] for p in history["publications"]] == [2]

        # A second channel reopens the stream; the first resumes from its cursor, no repeats.
        await page.evaluate(f"window.client.subscribe('{feed}')")
        for channel, text in ((feed, "f1"), (room, "r3")):
            r = await http.post(
                "/api/publish",
                json={"channel": channel, "data": {"text": text}},
                headers={"Authorization": f"Bearer {token('backend')}"},
            )
            assert r.status_code == 200
    await page.wait_for_function("window.received.length >= 4", timeout=10_000)
    received = await page.evaluate("window.received")
    assert [(p["channel"], p["offset"]) for p in received] == [
        (room, 1),
        (room, 2),
        (feed, 1),
        (room, 3),
    ]
    assert await page.evaluate("window.client.state") == "connected"


async def test_a_gateway_down_when_the_page_loads_is_waited_for_on_websocket(
    make_server: Callable[..., Awaitable[Any]], new_page: PageFactory
) -> None:
    """Handshakes that fail because the gateway is down are no proxy blocking upgrades:
    the client asks the gateway over HTTP before it falls back to SSE (it used to, after
    three failures, and stayed on SSE for good: no rpc, commands over HTTP), and here
    keeps trying WebSocket until the gateway is up."""
    pages = await make_server()
    port = free_port()  # the gateway's, not started yet
    room = unique_channel("chat")
    page = await new_page()
    url = f"http://127.0.0.1:{port}"
    await page.goto(
        f"{pages.url}/static/test-client.html?channel={room}&token={token('viewer')}&url={url}"
    )
    await page.wait_for_function(
        "window.events.filter((e) => e.type === 'retry').length >= 5", timeout=30_000
    )
    gateway = await make_server(port=port)
    await page.wait_for_function(
        "window.subscribed === true && window.client.transport === 'websocket'", timeout=30_000
    )
    assert [e for e in await page.evaluate("window.events") if e["type"] == "transport"] == []
    r = await page.evaluate("window.client.rpc('nothing', 1).catch((e) => e.code)")
    assert r == "not_found"  # a WebSocket's command: no hook configured
    assert gateway.gateway.connections.total == 1


async def test_a_handshake_never_answered_is_given_up_and_tried_again(
    make_server: Callable[..., Awaitable[Any]], new_page: PageFactory
) -> None:
    """A server that accepts the connection and never answers the upgrade: the browser
    waits for minutes and the client with it (no retry, no event); now the attempt is
    given up after ``commandTimeout`` and made again."""
    pages = await make_server()
    page = await new_page()
    async with silent_server() as silent:
        try:
            await page.goto(
                f"{pages.url}/static/test-client.html?channel=x&token={token('viewer')}"
                f"&url={silent.url}&commandTimeout=1000&transport=websocket"
            )
            await eventually(lambda: len(silent.accepted) >= 3, timeout=20)
        finally:
            await page.close()


async def page_minting_tokens(new_page: PageFactory) -> tuple[Any, list[str]]:
    """A page whose ``window.mintToken()`` (test-client.html's ``mint=1``) returns a new
    4 s token each call, and the list of the tokens it got."""
    minted: list[str] = []

    def mint() -> str:
        minted.append(tok := token("viewer", ttl=4))  # refreshed ~2 s in, halfway
        return tok

    page = await new_page()
    await page.expose_function("mintToken", mint)
    return page, minted


async def test_client_gets_a_new_token_after_4001_and_refreshes_it_before_expiry(
    make_server: Callable[..., Awaitable[Any]], new_page: PageFactory
) -> None:
    server = await make_server(jwt_leeway=0)
    channel = unique_channel()
    page, minted = await page_minting_tokens(new_page)
    bad = token("viewer", secret="not-the-gateway-secret-0123456789abcdef")
    await page.goto(f"{server.url}/static/test-client.html?mint=1&channel={channel}&token={bad}")
    await page.wait_for_function("window.client.state === 'connected'", timeout=10_000)
    events = await page.evaluate("window.events")
    assert [e["code"] for e in events if e["type"] == "retry"] == [4001], events
    assert len(minted) == 1

    # Three refreshes over the open socket: well past the first token's expiry, same socket.
    await page.wait_for_function(
        "window.events.filter((e) => e.type === 'token' && e.refreshed).length >= 3",
        timeout=15_000,
    )
    async with httpx.AsyncClient(base_url=server.url, trust_env=False) as http:
        r = await http.post(
            "/api/publish",
            json={"channel": channel, "data": {"n": 0}},
            headers={"Authorization": f"Bearer {token('backend')}"},
        )
        assert r.status_code == 200
    await received_up_to(page, 1)
    states = await page.evaluate("window.states")
    assert states == ["connecting", "connected"], states
    assert len(minted) >= 4


async def test_client_on_sse_reopens_its_stream_with_each_refreshed_token(
    make_server: Callable[..., Awaitable[Any]], new_page: PageFactory
) -> None:
    """A stream carries its token for life and the gateway ends it at ``exp``: the client
    reopens it with the refreshed token before then, resuming from its positions."""
    server = await make_server(jwt_leeway=0)
    channel = unique_channel()
    page, minted = await page_minting_tokens(new_page)
    await page.goto(f"{server.url}/static/test-client.html?mint=1&transport=sse&channel={channel}")
    await page.wait_for_function("window.client.state === 'connected'", timeout=10_000)
    async with httpx.AsyncClient(base_url=server.url, trust_env=False) as http:

        async def publish(n: int) -> None:
            r = await http.post(
                "/api/publish",
                json={"channel": channel, "data": {"n": n}},
                headers={"Authorization": f"Bearer {token('backend')}"},
            )
            assert r.status_code == 200, r.text

        await publish(1)
        await received_up_to(page, 1)
        # Three refreshes: well past the first tokens' expiry.
        await page.wait_for_function(
            "window.events.filter((e) => e.type === 'token' && e.refreshed).length >= 3",
            timeout=15_000,
        )
        await publish(2)
        received = await received_up_to(page, 2)
    assert [p["offset"] for p in received] == [1, 2]
    events = await page.evaluate("window.events")
    assert [e for e in events if e["type"] in ("retry", "error")] == [], events
    assert await page.evaluate("window.states") == ["connecting", "connected"]
    assert await page.evaluate("window.client.transport") == "sse"
    assert len(minted) >= 4  # the first token and three refreshes


# --------------------------------------------------------------------------- SSE over fetch()


async def test_client_on_sse_reopens_a_stream_that_went_silent(
    make_server: Callable[..., Awaitable[Any]], new_page: PageFactory
) -> None:
    """A stream whose path died without a FIN (a proxy that stopped forwarding, a phone
    that changed networks): EventSource waits on it for good, as it never shows the
    gateway's ``: ping``. The client reads the stream with fetch(), sees the pings stop,
    and after ``sseStallTimeout`` opens a new stream from its positions: what was
    published meanwhile arrives, once each, in order."""
    server = await make_server(sse_heartbeat=0.3)
    channel = unique_channel()
    async with (
        freezing_proxy(server.port) as proxy,
        httpx.AsyncClient(base_url=server.url, trust_env=False) as http,
    ):
        page = await new_page(
            f"{server.url}/static/test-client.html?transport=sse&sseStallTimeout=1500"
            f"&channel={channel}&token={token('viewer')}&url={proxy.url}"
        )
        await page.wait_for_function("window.client.state === 'connected'", timeout=10_000)
        await api_publish(http, channel, {"n": 1})
        await received_up_to(page, 1)
        assert proxy.freeze(b"GET /sse") == 1
        for n in (2, 3):
            await api_publish(http, channel, {"n": n})
        received = await received_up_to(page, 3)
        events = await page.evaluate("window.events")
        assert await page.evaluate("window.client.state") == "connected"
    assert [p["offset"] for p in received] == [1, 2, 3]
    retries = [e["reason"] for e in events if e["type"] == "retry"]
    assert retries == ["stream closed: silent for 1500 ms"], events
    assert sum(head.startswith(b"GET /sse") for head in proxy.heads) == 2


async def test_client_on_sse_asks_for_a_new_token_when_the_stream_is_refused(
    make_server: Callable[..., Awaitable[Any]], new_page: PageFactory
) -> None:
    """A 401 on the stream (a revoked token, one signed with an old key) is a WebSocket's
    4001: getToken() is asked for a new one. EventSource cannot see a status, so the
    client used to open the refused token's stream again and again."""
    server = await make_server()
    channel = unique_channel()
    async with httpx.AsyncClient(base_url=server.url, trust_env=False) as http:
        first = await api_publish(http, channel, {"n": 1})
        page, minted = await page_minting_tokens(new_page)
        bad = token("viewer", secret="not-the-gateway-secret-0123456789abcdef")
        await page.goto(f"{server.url}/static/test-client.html?mint=1&transport=sse&token={bad}")
        # From a position: no HTTP request first, the stream is the first to meet the token.
        await page.evaluate(
            "since => window.client.subscribe(window.channel = since.channel, {since})",
            {"channel": channel, "epoch": first["epoch"], "offset": 0},
        )
        received = await received_up_to(page, 1)
    assert [p["offset"] for p in received] == [1]
    retries = [e for e in await page.evaluate("window.events") if e["type"] == "retry"]
    assert [e.get("status") for e in retries] == [401], retries
    assert retries[0]["reason"].startswith("stream refused: invalid token"), retries
    assert len(minted) == 1


async def test_client_on_sse_stops_when_the_token_is_refused_and_it_has_no_other(
    make_server: Callable[..., Awaitable[Any]], new_page: PageFactory
) -> None:
    """No getToken(): nothing can make the next stream succeed, so the client stops with
    ``unauthorized``, as after a WebSocket's 4001, instead of retrying for good."""
    server = await make_server()
    bad = token("viewer", secret="not-the-gateway-secret-0123456789abcdef")
    page = await new_page(
        f"{server.url}/static/test-client.html?transport=sse&channel=news&token={bad}"
    )
    await page.wait_for_function("window.client.state === 'disconnected'", timeout=10_000)
    events = await page.evaluate("window.events")
    assert [e.get("code") for e in events if e["type"] == "error"] == ["unauthorized"], events
    assert [e for e in events if e["type"] == "retry"] == []


SSE_CHUNKS = [
    "\ufeffretry: 300\r",  # a BOM; "\r\n" split across two reads
    '\n: ping\r\n\r\nid: a~e~1\r\ndata: {"x":',
    "1}\r\rid: b\n:\ndata\ndata:  two\n\n",  # "\r" alone ends a line too
    'event: gap\ndata: {"channel":"c"}\n\nid: c\n\nid: x\u0000y\ndata: after id\n\n',
    "data: never dispatched, no blank line",
]


async def test_fetch_event_source_reads_streams_as_the_standard_says(
    make_server: Callable[..., Awaitable[Any]], new_page: PageFactory
) -> None:
    """The fetch() reader's parser, fed awkward reads: line ends of every kind, a line end
    split across reads, comments, multi-line data, an ``id`` with no data, a field with
    no colon, a leading space kept after the first, an unfinished event at the end."""
    server = await make_server()
    page = await new_page(f"{server.url}/static/test-client.html?transport=sse")
    await page.wait_for_function("window.client !== undefined", timeout=10_000)
    result = await page.evaluate(
        """async (chunks) => {
          const fetch = async () => new Response(new ReadableStream({
            async start(c) {
              for (const chunk of chunks) {
                c.enqueue(new TextEncoder().encode(chunk));
                await new Promise((r) => setTimeout(r, 5));
              }
              c.close();
            },
          }), { headers: { 'content-type': 'text/event-stream; charset=utf-8' } });
          const es = new window.GatewayClient.FetchEventSource('/sse', { fetch });
          const seen = [];
          es.onopen = () => seen.push(['open', es.readyState]);
          es.onmessage = (e) => seen.push(['message', e.data, e.lastEventId]);
          es.addEventListener('gap', (e) => seen.push(['gap', e.data, e.lastEventId]));
          await new Promise((resolve) => {
            es.onerror = (e) => { seen.push(['error', e.reason, es.readyState]); resolve(); };
          });
          return { seen, retry: es.retry };
        }""",
        SSE_CHUNKS,
    )
    assert result["seen"] == [
        ["open", 1],
        ["message", '{"x":1}', "a~e~1"],
        ["message", "\n two", "b"],
        ["gap", '{"channel":"c"}', "b"],
        ["message", "after id", "c"],
        ["error", "stream ended", 2],
    ]
    assert result["retry"] == 300
