"""What pages of other sites cannot make the gateway do (gateway.dev_guard): read its
dev-mode routes (no CORS there), reach them through a domain of their own (DNS
rebinding: a Host that is no local name), publish through the admin API with a form or
a simple fetch, or frame its pages; and what a deployment is told or refused."""

from __future__ import annotations

import logging

import httpx
import pytest

from gateway.__main__ import _warn_if_exposed
from gateway.demo_backend import COOKIE
from tests.conftest import MakeServer, RunningServer, token
from tests.helpers import api_client

EVIL = "https://evil.example"


@pytest.fixture
async def dev(make_server: MakeServer) -> RunningServer:
    server: RunningServer = await make_server(jwt_secret="", demo=True)  # dev mode
    return server


async def test_only_the_stream_the_api_and_the_client_script_answer_cors(
    dev: RunningServer,
) -> None:
    """Dev mode's token route and the admin API answered ``*`` to any page: a page the
    developer opened elsewhere could read a token for anything, and the gateway's
    figures."""
    async with api_client(dev) as http:
        for path in ("/dev/token", "/admin/api/stats", "/", "/static/test-client.html"):
            r = await http.get(path, headers={"Origin": EVIL})
            assert r.status_code == 200, (path, r.status_code)
            assert "access-control-allow-origin" not in r.headers, path
        preflight = {"Origin": EVIL, "Access-Control-Request-Method": "POST"}
        r = await http.options("/admin/api/publish", headers=preflight)
        assert "access-control-allow-origin" not in r.headers
        for path in ("/client.mjs", "/api/channels/news/history"):
            r = await http.get(path, headers={"Origin": EVIL, "Authorization": f"Bearer {token()}"})
            assert r.headers.get("access-control-allow-origin") == "*", path
        r = await http.options("/api/publish", headers=preflight)
        assert r.headers.get("access-control-allow-origin") == "*"


@pytest.mark.parametrize("path", ["/dev/token", "/admin/api/stats"])
async def test_dev_mode_routes_answer_local_hosts_only(dev: RunningServer, path: str) -> None:
    """A domain resolving to 127.0.0.1 makes a page of that domain same-origin with the
    gateway (DNS rebinding): its Host names that domain, not this machine."""
    async with api_client(dev) as http:
        for host in (
            "127.0.0.1",
            f"127.0.0.1:{dev.port}",
            "localhost:8000",
            "[::1]:80",
            "10.1.2.3",
        ):
            assert (await http.get(path, headers={"Host": host})).status_code == 200, host
        r = await http.get(path, headers={"Host": f"rebind.evil.example:{dev.port}"})
        assert r.status_code == 403, r.text
        assert r.json()["error"]["code"] == "forbidden"


async def test_admin_publish_takes_json_only(dev: RunningServer) -> None:
    """A form or a text/plain fetch from another site is sent without a preflight."""
    body = b'{"channel": "news", "data": 1}'
    async with api_client(dev) as http:
        for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
            r = await http.post("/admin/api/publish", content=body, headers={"Content-Type": kind})
            assert r.status_code == 400, (kind, r.text)
        r = await http.post(
            "/admin/api/publish", content=body, headers={"Content-Type": "application/json"}
        )
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("path", ["/", "/chat", "/admin", "/static/test-client.html"])
async def test_pages_are_not_framed_sniffed_or_referred(dev: RunningServer, path: str) -> None:
    async with api_client(dev) as http:
        r = await http.get(path)
    assert r.status_code == 200
    assert r.headers["x-frame-options"] == "DENY"
    assert r.headers["content-security-policy"] == "frame-ancestors 'none'"
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["referrer-policy"] == "no-referrer"


async def test_the_chat_session_is_taken_from_its_own_pages_only(dev: RunningServer) -> None:
    """The session cookie goes with a handshake from any page of the same site (another
    port of the host): the demo's connect hook lets in its own origin only."""
    async with api_client(dev) as http:
        cookie = (await http.post("/demo/login", json={"name": "ada"})).cookies[COOKIE]

        async def connect(origin: str | None) -> dict[str, object]:
            body = {
                "transport": "websocket",
                "client": "c-1",
                "claims": None,
                "cookies": {COOKIE: cookie},
                "origin": origin,
                "headers": {"host": "127.0.0.1:8000"},
            }
            reply: dict[str, object] = (await http.post("/demo/hooks/connect", json=body)).json()
            return reply

        assert (await connect("http://127.0.0.1:8000"))["result"] == "allow"
        assert (await connect(None))["result"] == "allow"  # not a browser
        refused = await connect("http://127.0.0.1:9999")
        assert refused["result"] == "refuse" and refused["code"] == "forbidden", refused


async def test_the_chat_cookie_is_secure_behind_https(dev: RunningServer) -> None:
    async with api_client(dev) as http:
        plain = await http.post("/demo/login", json={"name": "ada"})
        proxied = await http.post(
            "/demo/login", json={"name": "ada"}, headers={"X-Forwarded-Proto": "https"}
        )
    assert "secure" not in plain.headers["set-cookie"].lower()
    assert "; secure" in proxied.headers["set-cookie"].lower()


async def test_production_has_no_api_docs(make_server: MakeServer) -> None:
    """FastAPI's pages load Swagger's script from a CDN onto the gateway's origin."""
    server = await make_server(env="production")
    async with httpx.AsyncClient(base_url=server.url, trust_env=False) as http:
        for path in ("/docs", "/openapi.json"):
            assert (await http.get(path)).status_code == 404, path


@pytest.mark.parametrize(
    ("host", "warned"),
    [
        ("127.0.0.1", False),
        ("::1", False),
        ("localhost", False),
        ("0.0.0.0", True),
        ("", True),
        ("10.0.0.5", True),
    ],
)
def test_dev_mode_on_a_network_address_is_warned_of(
    host: str, warned: bool, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="gateway.__main__"):
        _warn_if_exposed(host)
    assert ("anyone who reaches this port" in caplog.text) == warned, caplog.text
