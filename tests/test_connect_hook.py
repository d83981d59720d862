"""The connect hook (cookie authentication, grants, server-side channels), the rpc
command and the subscribe hook's ``info``: a real gateway calling a real backend
(tests/fake_backend.py) over HTTP, with WebSocket and SSE clients."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import httpx
import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from gateway.hooks import load_hooks
from tests.conftest import MakeServer, RunningServer, eventually, token
from tests.fake_backend import HUGE, INFO, LOGIN, REFUSAL, FakeBackend
from tests.helpers import QueryPairs, api_client, api_publish, sse_params, sse_request, ws_client


@pytest.fixture
async def hooked(make_server: MakeServer, backend: FakeBackend) -> RunningServer:
    """Every hook of ``backend``, each with a 1 s timeout."""
    return await make_server(hooks=backend.hooks(subscribe=1, publish=1, rpc=1, connect=1))


def cookie_header(**cookies: str) -> dict[str, str]:
    return {"Cookie": "; ".join(f"{k}={v}" for k, v in cookies.items())} if cookies else {}


def tokenless(server: RunningServer, **cookies: str) -> Any:
    """A WebSocket client with no token in its URL, sending ``cookies``."""
    return ws_client(server, url=f"{server.ws_url}/ws", additional_headers=cookie_header(**cookies))


async def closed_at_once(server: RunningServer, **cookies: str) -> tuple[int | None, str | None]:
    async with tokenless(server, **cookies) as c:
        code, reason, frames = await c.expect_close(timeout=10)
    assert frames == []
    return code, reason


def test_the_documented_example_parses() -> None:
    hooks = load_hooks(
        '{"connect": {"url": "http://app/hooks/connect", "timeout": 2,'
        ' "headers": ["User-Agent"], "with_token": true},'
        ' "rpc": {"url": "http://app/hooks/rpc", "timeout": 2}}'
    )
    assert hooks["connect"].headers == ("user-agent",) and hooks["connect"].with_token
    assert hooks["rpc"].channels("anything")  # methods default to every method


# --------------------------------------------------------------------------- connect


async def test_a_cookie_alone_authenticates_a_websocket(hooked, backend):
    async with tokenless(hooked, session="dora") as c:
        await c.subscribe("room:1")
        assert (await c.publish("room:1", {"text": "hi"}))["offset"] == 1
        [push] = await c.publications("room:1", 1)
        assert push["data"] == {"text": "hi"}
        forbidden = await c.call("subscribe", channel="news")  # only what was granted
        assert forbidden["error"]["code"] == "forbidden"
    [call] = backend.calls_of("connect")
    assert call["transport"] == "websocket"
    assert call["claims"] is None
    assert call["cookies"] == {"session": "dora"}
    assert call["headers"] == {}
    assert call["client"].startswith("c-")


async def test_the_hooks_user_and_info_are_the_connections(make_server, backend):
    gw = await make_server(hooks=backend.hooks(connect=1), presence_channels="room:*")
    async with tokenless(gw, session="erin") as c, ws_client(gw, token("x", subscribe=["*"])) as w:
        await c.subscribe("room:2")
        reply = await w.call("presence", channel="room:2")
        [entry] = reply["result"]["clients"]
        assert entry["user"] == "erin" and entry["info"] == {"name": "erin"}
        [call] = [c for c in backend.calls_of("connect") if c["claims"] is None]
        assert entry["client"] == call["client"]  # the id the hook was told


async def test_no_cookie_is_refused_4001_by_the_hook(hooked, backend):
    assert await closed_at_once(hooked) == (4001, "unauthorized")
    [call] = backend.calls_of("connect")
    assert call["claims"] is None and call["cookies"] == {}


async def test_a_bad_token_is_refused_before_the_hook(hooked, backend):
    url = f"{hooked.ws_url}/ws?token=not-a-jwt"
    async with ws_client(hooked, url=url, additional_headers=cookie_header(session="x")) as c:
        code, reason, _ = await c.expect_close()
    assert (code, reason) == (4001, "unauthorized")
    expired = token("late", ttl=-60)
    async with ws_client(hooked, expired, additional_headers=cookie_header(session="x")) as c:
        code, reason, _ = await c.expect_close()
    assert (code, reason) == (4001, "token expired")
    assert backend.calls_of("connect") == []


async def test_a_token_connection_is_told_to_the_hook_and_gets_its_grant_on_top(hooked, backend):
    tok = token("fred", subscribe=["news"], publish=[], info={"a": 1})
    async with ws_client(hooked, tok, additional_headers=cookie_header(session="fred")) as c:
        await c.subscribe("news")  # the token's
        await c.subscribe("room:3")  # the grant's
        assert (await c.publish("room:3", 1))["offset"] == 1
    [call] = backend.calls_of("connect")
    assert call["claims"]["sub"] == "fred" and call["claims"]["subscribe"] == ["news"]


async def test_with_token_false_skips_the_hook_for_token_connections(make_server, backend):
    hooks = {"connect": backend.connect_hook(with_token=False, timeout=1)}
    gw = await make_server(hooks=orjson.dumps(hooks).decode())
    async with ws_client(gw, token("gina")) as c:
        await c.ping_ok()
    assert backend.calls_of("connect") == []
    async with tokenless(gw, session="gina") as c:
        await c.ping_ok()
    assert len(backend.calls_of("connect")) == 1


async def test_headers_are_sent_only_from_the_allow_list_with_the_origin(make_server, backend):
    hooks = {"connect": backend.connect_hook(headers=["User-Agent", "X-Tenant"], timeout=1)}
    gw = await make_server(hooks=orjson.dumps(hooks).decode())
    headers = {
        **cookie_header(session="hal", other="1"),
        "X-Tenant": "t42",
        "X-Secret": "no",
        "Origin": "https://app.example",
        "User-Agent": "test-agent/1",
    }
    async with ws_client(gw, url=f"{gw.ws_url}/ws", additional_headers=headers) as c:
        await c.ping_ok()
    [call] = backend.calls_of("connect")
    assert call["headers"] == {"user-agent": "test-agent/1", "x-tenant": "t42"}
    assert call["origin"] == "https://app.example"
    assert call["cookies"] == {"session": "hal", "other": "1"}


@pytest.mark.parametrize(
    ("kind", "close"),
    [
        ("refuse", (4003, REFUSAL)),
        ("longrefusal", (4003, "é" * 61)),  # cut to 123 bytes, on a character boundary
        ("refuselist", (4003, REFUSAL)),
        ("refuseinternal", (4003, REFUSAL)),
        ("hang", (1011, "connect hook failed")),
        ("http500", (1011, "connect hook failed")),
        ("badjson", (1011, "connect hook failed")),
        ("unknown", (1011, "connect hook failed")),
        ("nouser", (1011, "connect hook failed")),
    ],
)
async def test_a_refusing_or_failing_connect_hook_closes_the_websocket(
    hooked, backend, kind, close
):
    started = time.monotonic()
    assert await closed_at_once(hooked, hook=kind) == close
    assert time.monotonic() - started < 8  # the hook's 1 s timeout, not a hang
    assert hooked.gateway.connections.total == 0
    async with api_client(hooked) as http:
        text = (await http.get("/metrics")).text
    refusals = ("refuse", "longrefusal", "refuselist", "refuseinternal")
    outcome = "refuse" if kind in refusals else {"hang": "timeout"}.get(kind)
    outcome = outcome or {"http500": "bad_status"}.get(kind, "bad_reply")
    assert f'gateway_hook_outcomes_total{{hook="connect",outcome="{outcome}"}} 1.0' in text


async def test_server_side_channels_deliver_without_a_subscribe(hooked, backend):
    async with tokenless(hooked, session="ivy", channels="room:ivy|alerts:ivy") as c:
        async with api_client(hooked) as http:
            await eventually(lambda: hooked.gateway.hub.subscription_count == 2)
            await api_publish(http, "alerts:ivy", {"n": 1})
            await api_publish(http, "room:ivy", {"n": 2})
        [alert] = await c.publications("alerts:ivy", 1)
        [room] = await c.publications("room:ivy", 1)
        assert (alert["data"], room["data"]) == ({"n": 1}, {"n": 2})
        again = await c.call("subscribe", channel="room:ivy")
        assert again["error"]["code"] == "bad_request"
        assert "already subscribed" in again["error"]["message"]
        # One no pattern covers (the grant's are room:*): already subscribed all the same.
        alerts = await c.call("subscribe", channel="alerts:ivy")
        assert alerts["error"]["code"] == "bad_request", alerts
        assert "already subscribed" in alerts["error"]["message"]
        assert (await c.call("unsubscribe", channel="alerts:ivy"))["ok"] is True


async def test_the_grants_expiry_ends_the_connection(hooked, backend):
    """At ``expire_at`` itself: the token's leeway (5 s) is for clock skew between
    the token's issuer and the gateway, not for a moment the backend chose."""
    started = time.monotonic()
    async with tokenless(hooked, session="jo", ttl="0.5") as c:
        code, reason, _ = await c.expect_close(timeout=10)
    assert (code, reason) == (4001, "token expired")
    assert hooked.settings.jwt_leeway == 5 and time.monotonic() - started < 5


async def test_a_refreshed_token_keeps_what_the_hook_granted(hooked, backend):
    async with tokenless(hooked, session="kim") as c:
        reply = await c.call("refresh", token=token("kim", subscribe=["news"]))
        assert reply["ok"] is True, reply
        await c.subscribe("news")
        await c.subscribe("room:4")  # still granted
        other = await c.call("refresh", token=token("someone-else"))
        assert other["error"]["code"] == "forbidden"


async def test_a_token_whose_user_the_hook_renamed_refreshes_with_the_tokens_user(hooked, backend):
    """The hook made ``alice``'s connection ``bob``'s: a fresh token for ``alice`` is the
    refresh of the one it opened with (it was refused: a connection whose hook renames
    its user could not refresh, and ended at its token's expiry); one for ``bob``, who
    never had a token on it, is not."""
    cookies = cookie_header(session="bob")
    async with ws_client(hooked, token("alice", ttl=60), additional_headers=cookies) as c:
        await c.subscribe("room:6")  # the grant's: the connection is bob's
        reply = await c.call("refresh", token=token("alice", subscribe=["news"]))
        assert reply["ok"] is True, reply
        await c.subscribe("news")
        await c.subscribe("room:7")  # still granted
        bobs = await c.call("refresh", token=token("bob"))
        assert bobs["error"]["code"] == "forbidden", bobs
        reply = await c.call("refresh", token=token("alice"))  # and again
        assert reply["ok"] is True, reply


async def test_sse_with_a_cookie_alone_and_the_hooks_channels_in_the_cursor(hooked, backend):
    async with api_client(hooked) as http:
        headers = cookie_header(session="lee", channels="alerts:lee")
        params: QueryPairs = [("channel", "room:5")]
        async with http.stream("GET", "/sse", params=params, headers=headers) as response:
            assert response.status_code == 200
        [call] = backend.calls_of("connect")
        assert call["transport"] == "sse" and call["channels"] == ["room:5"]
        assert call["claims"] is None
        # Resume: both channels, the hook's included, come back from the cursor.
        async with http.stream("GET", "/sse", params=params, headers=headers) as response:
            assert response.status_code == 200
            opening = ""
            async for line in response.aiter_lines():
                if line.startswith("id:"):
                    opening = line[3:].strip()
                    break
        await api_publish(http, "alerts:lee", {"n": 1})
        await api_publish(http, "room:5", {"n": 2})
        resumed = sse_params([], None, opening) + params
        async with http.stream("GET", "/sse", params=resumed, headers=headers) as response:
            assert response.status_code == 200
            seen = []
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    seen.append(orjson.loads(line[5:]))
                    if len(seen) == 2:
                        break
        assert sorted((p["channel"], p["data"]["n"]) for p in seen) == [
            ("alerts:lee", 1),
            ("room:5", 2),
        ]


@pytest.mark.parametrize(
    ("cookies", "status", "code"),
    [
        ({}, 401, "unauthorized"),
        ({"hook": "refuse"}, 403, "forbidden"),
        ({"hook": "http500"}, 500, "internal"),
        ({"session": "max"}, 403, "forbidden"),  # news is not granted
    ],
)
async def test_sse_refused_by_the_connect_hook_is_an_http_error(
    hooked, backend, cookies, status, code
):
    async with api_client(hooked) as http:
        got, _, body = await sse_request(http, [("channel", "news")], cookie_header(**cookies))
    assert (got, body["error"]["code"]) == (status, code)
    if not cookies:
        assert body["error"]["message"] == LOGIN  # the backend's words reach the client
    await eventually(lambda: not hooked.gateway.hub.sessions)


async def test_sse_whose_grant_has_expired_already_is_a_401(hooked, backend):
    """An ``expire_at`` already past (a WebSocket gets 4001 ``token expired``): the
    stream opened 200 and ended at once, and EventSource reopened it every retry, asking
    the backend again each time, for good."""
    async with api_client(hooked) as http:
        cookies = cookie_header(session="uma", ttl="-1")
        got, _, body = await sse_request(http, [("channel", "room:1")], cookies)
    assert (got, body["error"]) == (401, {"code": "unauthorized", "message": "token expired"})
    await eventually(lambda: not hooked.gateway.hub.sessions)


async def test_sse_bad_requests_are_refused_without_asking_the_hook(hooked, backend):
    async with api_client(hooked) as http:
        cookies = cookie_header(session="n")
        tok = token("n")
        got, _, _ = await sse_request(http, [("channel", "bad name!"), ("token", tok)], cookies)
        assert got == 400
        got, _, _ = await sse_request(
            http, [("channel", "room:1"), ("token", "not-a-jwt")], cookies
        )
        assert got == 401
    assert backend.calls_of("connect") == []


async def test_sse_without_a_token_is_authenticated_first(hooked, backend):
    async with api_client(hooked) as http:
        # No cookie: unauthorized, as without hooks, whatever else is wrong.
        got, _, _ = await sse_request(http, [("channel", "bad name!")])
        assert got == 401
        got, _, _ = await sse_request(http, [("channel", "bad name!")], cookie_header(session="o"))
        assert got == 400
    assert len(backend.calls_of("connect")) == 2


async def test_a_burst_of_a_thousand_connects_through_the_hook(make_server, backend):
    # The clients, the gateway and the backend share this process's one loop: a timeout
    # for that, not for a backend of its own.
    hooked = await make_server(hooks=backend.hooks(connect=30))

    async def one(i: int) -> None:
        headers = cookie_header(session=f"u{i}")
        url = f"{hooked.ws_url}/ws"
        async with connect(url, additional_headers=headers, proxy=None, open_timeout=60) as ws:
            await ws.send(orjson.dumps({"id": 1, "op": "subscribe", "channel": "room:b"}).decode())
            reply = orjson.loads(await asyncio.wait_for(ws.recv(), 30))
            assert reply["ok"] is True, reply

    semaphore = asyncio.Semaphore(200)

    async def bounded(i: int) -> None:
        async with semaphore:
            await one(i)

    await asyncio.wait_for(asyncio.gather(*(bounded(i) for i in range(1000))), 120)
    calls = backend.calls_of("connect")
    assert len(calls) == 1000
    assert len({c["client"] for c in calls}) == 1000
    await eventually(lambda: hooked.gateway.connections.total == 0, timeout=30)


async def test_connections_let_in_while_the_hook_waits_keep_to_the_limit(make_server, backend):
    """Regression: the limit was checked before the hook only, so every client that
    arrived while it waited was let in (50 of them, with a limit of 10). Now the ones
    past it are closed 1013 as soon as the hook answers, in both server modes."""
    gw = await make_server(hooks=backend.hooks(connect=30), max_connections=3)
    async with contextlib.AsyncExitStack() as stack:
        clients = [tokenless(gw, session=f"cap{i}", hook="hang") for i in range(8)]
        entering = [asyncio.ensure_future(stack.enter_async_context(c)) for c in clients]
        await eventually(lambda: backend.pending == 8)  # all eight asked at once
        backend.release.set()
        outcomes: list[object] = []
        for c in await asyncio.gather(*entering):
            try:
                await c.ping_ok()
                outcomes.append("open")
            except ConnectionClosed as exc:
                assert exc.rcvd is not None, exc
                outcomes.append((exc.rcvd.code, exc.rcvd.reason))
        assert sorted(outcomes, key=str) == [(1013, "try again later")] * 5 + ["open"] * 3
        assert gw.gateway.connections.total == 3
    await eventually(lambda: gw.gateway.connections.total == 0)


# --------------------------------------------------------------------------- subscribe info


async def test_the_subscribe_hooks_info_is_in_the_reply(hooked, backend):
    async with ws_client(hooked) as c:
        result = await c.subscribe("private:info.1")
        assert result["info"] == INFO
        plain = await c.subscribe("private:allow.1")
        assert "info" not in plain


async def test_publish_hook_data_over_the_limit_is_too_large(hooked, backend):
    async with ws_client(hooked) as c:
        reply = await c.call("publish", channel="chat:huge.1", data={"text": "x"})
        assert reply["error"]["code"] == "too_large"
        async with api_client(hooked) as http:
            r = await http.get(
                "/api/channels/chat:huge.1/history",
                headers={"Authorization": f"Bearer {token('backend')}"},
            )
        assert r.json()["publications"] == []
    assert hooked.gateway.settings.max_message_bytes < HUGE


# --------------------------------------------------------------------------- rpc


async def test_rpc_answers_with_the_backends_data(hooked, backend):
    async with ws_client(hooked, token("olga")) as c:
        reply = await c.call("rpc", method="rpc:echo", data={"room": "lobby", "before": 9})
        assert reply == {
            "id": reply["id"],
            "ok": True,
            "result": {"data": {"echo": {"room": "lobby", "before": 9}, "user": "olga"}},
        }
        no_data = await c.call("rpc", method="rpc:echo")
        assert no_data["result"]["data"]["echo"] is None
    first = backend.calls_of("rpc")[0]
    assert first["method"] == "rpc:echo" and first["claims"]["sub"] == "olga"


@pytest.mark.parametrize(
    ("method", "code", "message"),
    [
        ("rpc:refuse", "forbidden", REFUSAL),
        ("rpc:refusecode", "not_found", REFUSAL),
        ("other", "not_found", "no rpc method other"),
        ("rpc:http500", "internal", "rpc hook failed: HTTP 500"),
        ("rpc:hang", "internal", "rpc hook failed: no answer within 1s"),
        ("rpc:deep", "internal", "rpc hook failed: the reply is nested too deeply"),
        # written whole, not inside the client's reply: the connection was closed 1011
        ("rpc:edge", "internal", "rpc hook failed: the reply is nested too deeply"),
        ("rpc:toobig", "internal", "rpc hook failed: the reply is over 1 MiB"),
    ],
)
async def test_rpc_refusals_and_failures_are_error_replies(hooked, backend, method, code, message):
    async with ws_client(hooked) as c:
        reply = await c.call("rpc", method=method, data=1, timeout=10)
        assert reply["ok"] is False
        assert reply["error"] == {"code": code, "message": message}
        await c.ping_ok()


async def test_rpc_without_a_hook_is_not_found(make_server):
    gw = await make_server()
    async with ws_client(gw) as c:
        reply = await c.call("rpc", method="history", data={})
        assert reply["error"]["code"] == "not_found"


async def test_bad_rpc_frames(hooked, backend):
    async with ws_client(hooked) as c:
        invalid = await c.call("rpc", method="no spaces")
        assert invalid["error"]["code"] == "bad_request"
        for _ in range(2):  # malformed: counted, the third closes
            reply = await c.call("rpc", method=7)
            assert reply["error"]["code"] == "bad_request"
        await c.send({"id": 99, "op": "rpc"})
        code, reason, _ = await c.expect_close()
    assert (code, reason) == (4002, "bad request")
    assert backend.calls_of("rpc") == []


async def test_rpc_counts_toward_the_clients_publish_rate(make_server, backend):
    gw = await make_server(hooks=backend.hooks(), client_publish_rate=2)
    async with ws_client(gw) as c:
        replies = [await c.call("rpc", method="rpc:echo", data=i) for i in range(6)]
    codes = [r["error"]["code"] if not r["ok"] else "ok" for r in replies]
    assert "rate_limited" in codes and codes[0] == "ok"
    assert len(backend.calls_of("rpc")) == codes.count("ok")


# --------------------------------------------------------------------------- fan-out


async def test_fan_out_runs_at_full_rate_while_a_publish_hook_hangs(make_server, backend):
    gw = await make_server(hooks=backend.hooks(publish=60))
    async with (
        ws_client(gw) as stuck,
        ws_client(gw) as sub,
        api_client(gw) as http,
    ):
        await sub.subscribe("news")
        for i in range(3):
            await stuck.send({"id": i, "op": "publish", "channel": f"chat:hang.{i}", "data": i})
        await eventually(lambda: backend.pending == 1)  # one at a time: in order
        body = "\n".join(orjson.dumps({"n": i}).decode() for i in range(2000)) + "\n"
        r = await http.post(
            "/api/publish/stream",
            params={"channel": "news"},
            content=body,
            headers={"Authorization": f"Bearer {token('backend')}"},
        )
        assert r.json()["published"] == 2000
        pushes = await sub.publications("news", 2000, timeout=30)
        assert [p["data"]["n"] for p in pushes] == list(range(2000))
        assert backend.pending == 1  # all the while
        backend.release.set()
        for i in range(3):
            assert (await stuck.reply(i))["ok"] is True


async def test_without_hooks_nothing_changes_for_a_tokenless_client(make_server):
    gw = await make_server()
    async with ws_client(gw, url=f"{gw.ws_url}/ws") as c:
        code, reason, _ = await c.expect_close()
    assert (code, reason) == (4001, "unauthorized")
    async with httpx.AsyncClient(base_url=gw.url, trust_env=False) as http:
        r = await http.get("/sse", params={"channel": "news"})
    assert r.status_code == 401


# --------------------------------------------------------------------------- below ASGI


@pytest.mark.gateway_protocols
async def test_the_connect_hook_is_awaited_below_asgi(hooked, backend):
    from gateway.server.upgraded import UpgradedWebSocket

    async with tokenless(hooked, session="pat") as c:
        await c.subscribe("room:p")
        connections = hooked.server.server_state.connections
        assert [type(p) for p in connections if isinstance(p, UpgradedWebSocket)] == [
            UpgradedWebSocket
        ]
    assert len(backend.calls_of("connect")) == 1
    await eventually(lambda: hooked.gateway.connections.total == 0)


@pytest.mark.gateway_protocols
async def test_a_client_gone_while_the_connect_hook_waits_leaves_nothing(make_server, backend):
    gw = await make_server(hooks=backend.hooks(connect=30))
    _, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        b"Cookie: hook=hang\r\n\r\n"
    )
    await writer.drain()
    await eventually(lambda: backend.pending == 1)
    writer.close()
    await writer.wait_closed()
    # Nothing is read while the hook is asked (the client's leaving shows once it
    # answered): the connection is held no longer than the hook's timeout.
    backend.release.set()
    await eventually(lambda: not gw.server.server_state.connections)
    assert gw.gateway.connections.total == 0 and not gw.gateway.hub.sessions
    async with tokenless(gw, session="quinn") as c:  # the worker goes on
        await c.ping_ok()
