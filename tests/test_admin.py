"""The admin API: who may use it, what its figures say (the same as /metrics), its
channel tools, and the cluster-wide view over a shared broker."""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections.abc import Callable
from typing import Any

import httpx
import pydantic
import pytest

from gateway.settings import Settings
from tests.conftest import MakeServer, token
from tests.helpers import api_client, api_publish, open_sse, ws_client

ADMIN = "admin-" + secrets.token_hex(12)


def admin(tok: str = ADMIN) -> dict[str, str]:
    return {"Authorization": f"Bearer {tok}"}


async def stats(http: httpx.AsyncClient, tok: str = ADMIN) -> dict[str, Any]:
    r = await http.get("/admin/api/stats", headers=admin(tok))
    assert r.status_code == 200, (r.status_code, r.text)
    body: dict[str, Any] = r.json()
    return body


async def stats_until(
    http: httpx.AsyncClient, check: Callable[[dict[str, Any]], bool], timeout: float = 5.0
) -> dict[str, Any]:
    """Poll the stats until ``check`` holds, up to ``timeout``; the last seen in the failure."""
    deadline = time.monotonic() + timeout
    while True:
        body = await stats(http)
        if check(body):
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"stats never matched within {timeout}s: {body}")
        await asyncio.sleep(0.05)


# --------------------------------------------------------------------------- access


async def test_admin_is_open_in_dev_mode(make_server: MakeServer) -> None:
    server = await make_server(jwt_secret="")
    async with api_client(server) as http:
        page = await http.get("/admin")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert "<title>Gateway admin</title>" in page.text
        r = await http.get("/admin/api/stats")
        assert r.status_code == 200
        assert r.json()["dev_mode"] is True


async def test_admin_does_not_exist_with_a_key_and_no_admin_token(make_server: MakeServer) -> None:
    server = await make_server()  # a JWT secret, no GATEWAY_ADMIN_TOKEN
    async with api_client(server) as http:
        for method, path in [
            ("GET", "/admin"),
            ("GET", "/admin/api/stats"),
            ("POST", "/admin/api/publish"),
            ("GET", "/admin/api/channels/news/history"),
            ("GET", "/admin/api/channels/news/presence"),
        ]:
            r = await http.request(method, path, headers=admin())
            assert r.status_code == 404, (method, path, r.status_code)


async def test_admin_api_needs_the_admin_token_when_one_is_set(make_server: MakeServer) -> None:
    server = await make_server(admin_token=ADMIN)
    async with api_client(server) as http:
        assert (await http.get("/admin")).status_code == 200  # the page holds no figures
        wrong = [
            {},
            admin("x" + ADMIN),
            admin(ADMIN[:-1]),
            admin(token("root")),  # a user's JWT is not the admin token
            {"Authorization": ADMIN},  # not a bearer
        ]
        for headers in wrong:
            r = await http.get("/admin/api/stats", headers=headers)
            assert r.status_code == 401, (headers, r.status_code)
            assert r.json()["error"]["code"] == "unauthorized"
        r = await http.post(
            "/admin/api/publish", json={"channel": "news", "data": 1}, headers=admin("nope")
        )
        assert r.status_code == 401
        assert (await stats(http))["totals"]["counters"]["publications"] == 0  # none made
        r = await http.get("/admin/api/stats", headers={"Authorization": f"bearer {ADMIN}"})
        assert r.status_code == 200


async def test_a_set_admin_token_is_required_in_dev_mode_too(make_server: MakeServer) -> None:
    server = await make_server(jwt_secret="", admin_token=ADMIN)
    async with api_client(server) as http:
        assert (await http.get("/admin/api/stats")).status_code == 401
        assert (await http.get("/admin/api/stats", headers=admin())).status_code == 200


def test_a_short_admin_token_is_refused_at_start() -> None:
    with pytest.raises(pydantic.ValidationError, match="at least 16 characters"):
        Settings(jwt_secret="s" * 32, admin_token="short")


# --------------------------------------------------------------------------- figures


def metric(text: str, name: str, labels: str = "") -> float:
    match = re.search(rf"^{name}{re.escape(labels)} (\S+)$", text, re.M)
    assert match is not None, (name, labels)
    return float(match.group(1))


async def test_stats_follow_connections_subscriptions_and_publications(
    make_server: MakeServer,
) -> None:
    server = await make_server(admin_token=ADMIN)
    async with api_client(server) as http:
        first = await stats(http)
        assert first["worker"] == first["workers"][0]["worker"]
        assert first["totals"]["workers"] == 1
        worker = first["workers"][0]
        assert worker["broker"] == {"kind": "memory", "ready": True, "reconnects": 0}
        assert worker["connections"] == {"websocket": 0, "sse": 0}
        assert worker["top_channels"] == []
        async with (
            ws_client(server) as a,
            ws_client(server) as b,
            open_sse(http, ["room"]) as sse,
        ):
            await sse.event()  # the opening block: subscribed
            await a.subscribe("room")
            await a.subscribe("side")
            await b.subscribe("room")
            now = await stats_until(
                http, lambda s: s["totals"]["connections"] == {"websocket": 2, "sse": 1}
            )
            totals = now["totals"]
            assert totals["subscriptions"] == 4
            assert totals["top_channels"] == [
                {"channel": "room", "subscribers": 3},
                {"channel": "side", "subscribers": 1},
            ]
            assert now["workers"][0]["channels"] == 2
            for n in range(2):
                await api_publish(http, "room", {"n": n})
            await a.publications("room", 2)
            await b.publications("room", 2)
            await sse.publications(2)
            after = await stats_until(http, lambda s: s["totals"]["counters"]["deliveries"] >= 6)
            assert after["totals"]["counters"]["publications"] == 2
            assert after["totals"]["counters"]["deliveries"] == 6

            # The same figures as /metrics.
            text = (await http.get("/metrics")).text
            assert metric(text, "gateway_connections", '{transport="websocket"}') == 2
            assert metric(text, "gateway_connections", '{transport="sse"}') == 1
            assert metric(text, "gateway_subscriptions") == 4
            assert metric(text, "gateway_channels") == 2
            assert metric(text, "gateway_publications_total") == 2
            assert metric(text, "gateway_deliveries_total") == 6
        gone = await stats_until(
            http, lambda s: s["totals"]["connections"] == {"websocket": 0, "sse": 0}
        )
        assert gone["totals"]["subscriptions"] == 0
        assert gone["totals"]["top_channels"] == []


async def test_slow_consumer_closes_are_counted_per_transport(make_server: MakeServer) -> None:
    server = await make_server(admin_token=ADMIN)
    server.gateway.connections.slow_closes["sse"] += 3  # as Connections.closed(slow=True) does
    async with api_client(server) as http:
        body = await stats(http)
    assert body["workers"][0]["slow_consumer_closes"] == {"websocket": 0, "sse": 3}
    assert body["totals"]["slow_consumer_closes"] == {"websocket": 0, "sse": 3}


async def test_stats_show_the_broker_down_and_its_reconnect(
    make_server: MakeServer, own_redis_server: Any, redis_prefix: str
) -> None:
    server = await make_server(
        admin_token=ADMIN, broker_url=own_redis_server.url, broker_prefix=redis_prefix
    )
    async with api_client(server) as http:
        broker = (await stats(http))["workers"][0]["broker"]
        assert broker == {"kind": "redis", "ready": True, "reconnects": 0}
        own_redis_server.stop()
        await stats_until(http, lambda s: s["workers"][0]["broker"]["ready"] is False)
        own_redis_server.restart()
        back = await stats_until(
            http,
            lambda s: s["workers"][0]["broker"]["ready"] and s["totals"]["broker_reconnects"] >= 1,
            timeout=15,
        )
    assert back["workers"][0]["broker"]["reconnects"] == back["totals"]["broker_reconnects"]


# --------------------------------------------------------------------------- channel tools


async def test_admin_publishes_and_reads_history_and_presence(make_server: MakeServer) -> None:
    server = await make_server(admin_token=ADMIN)
    async with api_client(server) as http, ws_client(server, token("alice")) as alice:
        await alice.subscribe("chat:lobby")
        r = await http.post(
            "/admin/api/publish",
            json={"channel": "chat:lobby", "data": {"text": "from admin"}},
            headers=admin(),
        )
        assert r.status_code == 200, r.text
        assert r.json()["offset"] == 1
        [push] = await alice.publications("chat:lobby", 1)
        assert push["data"] == {"text": "from admin"}

        r = await http.get("/admin/api/channels/chat:lobby/history?limit=5", headers=admin())
        assert r.status_code == 200
        assert r.json()["publications"] == [{"offset": 1, "data": {"text": "from admin"}}]

        r = await http.get("/admin/api/channels/chat:lobby/presence", headers=admin())
        body = r.json()
        assert body["presence"] is True and body["local_subscribers"] == 1
        assert [c["user"] for c in body["clients"]] == ["alice"]

        r = await http.get("/admin/api/channels/news/presence", headers=admin())
        assert r.json() == {"presence": False, "clients": [], "local_subscribers": 0}

        for bad in (
            http.post(
                "/admin/api/publish", json={"channel": "no spaces", "data": 1}, headers=admin()
            ),
            http.post("/admin/api/publish", json={"channel": "news"}, headers=admin()),
            http.get("/admin/api/channels/no%20spaces/history", headers=admin()),
        ):
            r = await bad
            assert r.status_code == 400, r.text
            assert r.json()["error"]["code"] == "bad_request"


# --------------------------------------------------------------------------- cluster


@pytest.fixture(params=["memory", "redis"])
def shared_broker(request: pytest.FixtureRequest) -> dict[str, str]:
    """Settings of two workers of one cluster: a named memory namespace or one Redis."""
    if request.param == "memory":
        return {"broker_url": f"memory://admin-{secrets.token_hex(4)}"}
    redis_server = request.getfixturevalue("redis_server")
    prefix = request.getfixturevalue("redis_prefix")
    return {"broker_url": redis_server.url, "broker_prefix": prefix}


async def test_stats_cover_every_worker_of_the_cluster(
    make_server: MakeServer, shared_broker: dict[str, str]
) -> None:
    a = await make_server(admin_token=ADMIN, **shared_broker)
    b = await make_server(admin_token=ADMIN, **shared_broker)
    async with api_client(a) as http, ws_client(b) as c1, ws_client(b) as c2, ws_client(a) as c3:
        for client in (c1, c2, c3):
            await client.subscribe("shared")
        await c1.subscribe("only-b")
        body = await stats_until(
            http,
            lambda s: (
                s["totals"]["workers"] == 2
                and s["totals"]["connections"]["websocket"] == 3
                and s["totals"]["subscriptions"] == 4
            ),
            timeout=10,
        )
    here, other = body["workers"]
    assert here["worker"] == body["worker"] != other["worker"]
    assert (here["connections"]["websocket"], other["connections"]["websocket"]) == (1, 2)
    assert body["totals"]["top_channels"] == [
        {"channel": "shared", "subscribers": 3},
        {"channel": "only-b", "subscribers": 1},
    ]
    assert other["broker"]["ready"] is True
    assert "127.0.0.1" not in str(other["broker"])  # the broker's kind, never its address
