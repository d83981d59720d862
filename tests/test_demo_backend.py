"""The chat demo's backend (gateway.demo_backend): its login and the hooks it answers, called
over HTTP as the gateway calls them, on a dev-mode gateway with the demo on; then
``python -m gateway`` in dev mode, whose hooks it is, with real WebSocket and SSE clients."""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect

from gateway.__main__ import _local_url
from gateway.demo_backend import (
    COOKIE,
    HISTORY_METHOD,
    MAX_PAGE,
    MAX_TEXT,
    SESSION_SECONDS,
    Rooms,
    Sessions,
)
from tests.conftest import RunningServer
from tests.helpers import WsClient, api_client
from tests.procs import GatewayProcess

ROOM = "chat:demo-lobby"


@pytest.fixture
async def demo(make_server: Any) -> RunningServer:
    server: RunningServer = await make_server(jwt_secret="", demo=True)  # dev mode
    return server


@pytest.fixture
async def http(demo: RunningServer) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(demo) as client:
        yield client


async def hook(http: httpx.AsyncClient, name: str, body: dict[str, Any]) -> dict[str, Any]:
    response = await http.post(f"/demo/hooks/{name}", json=body)
    assert response.status_code == 200, response.text
    reply: dict[str, Any] = response.json()
    return reply


async def login(http: httpx.AsyncClient, name: str) -> str:
    response = await http.post("/demo/login", json={"name": name})
    assert response.status_code == 200, response.text
    return response.cookies[COOKIE]


def opening(cookies: dict[str, str], claims: dict[str, Any] | None = None) -> dict[str, Any]:
    """A connect hook request as the gateway sends it."""
    return {
        "transport": "websocket",
        "client": "c-1",
        "claims": claims,
        "cookies": cookies,
        "headers": {},
    }


async def say(http: httpx.AsyncClient, text: str, channel: str = ROOM) -> dict[str, Any]:
    return await hook(
        http,
        "publish",
        {"channel": channel, "user": "ada", "client": "c-1", "data": {"text": text}},
    )


async def history(http: httpx.AsyncClient, data: Any) -> dict[str, Any]:
    return await hook(
        http,
        "rpc",
        {"method": HISTORY_METHOD, "user": "ada", "client": "c-1", "data": data, "claims": None},
    )


# --------------------------------------------------------------------------- login


async def test_login_sets_an_http_only_lax_session_cookie_and_logout_clears_it(
    http: httpx.AsyncClient,
) -> None:
    response = await http.post("/demo/login", json={"name": "  Ada \t Lovelace "})
    assert response.status_code == 200
    # Not wired by python -m gateway here: the page is told to use a dev token.
    assert response.json() == {"user": "Ada Lovelace", "connect": "token"}
    set_cookie = response.headers["set-cookie"].lower()
    assert set_cookie.startswith(f"{COOKIE}=")
    for attribute in ("httponly", "samesite=lax", "path=/", f"max-age={SESSION_SECONDS}"):
        assert attribute in set_cookie, set_cookie
    assert (await http.get("/demo/session")).json()["user"] == "Ada Lovelace"

    response = await http.post("/demo/logout")
    assert response.json()["user"] is None
    assert "max-age=0" in response.headers["set-cookie"].lower()
    assert COOKIE not in http.cookies
    assert (await http.get("/demo/session")).json()["user"] is None


async def test_login_takes_a_form_too(http: httpx.AsyncClient) -> None:
    response = await http.post("/demo/login", data={"name": "bob"})
    assert response.status_code == 200 and response.json()["user"] == "bob"


@pytest.mark.parametrize("name", ["", "   ", "x" * 41, "bell\x07", None, 42])
async def test_login_refuses_a_name_nobody_could_read(http: httpx.AsyncClient, name: Any) -> None:
    response = await http.post("/demo/login", json={"name": name})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "bad_request"
    assert COOKIE not in response.cookies


# --------------------------------------------------------------------------- connect


async def test_connect_allows_the_session_cookie_as_its_user_in_the_demo_rooms(
    http: httpx.AsyncClient,
) -> None:
    cookie = await login(http, "ada")
    reply = await hook(http, "connect", opening({COOKIE: cookie, "other": "x"}))
    assert reply["result"] == "allow"
    assert reply["user"] == "ada" and reply["info"] == {"name": "ada"}
    assert reply["subscribe"] == reply["publish"] == ["chat:demo-*"]
    assert time.time() < reply["expire_at"] <= time.time() + SESSION_SECONDS


async def test_connect_refuses_no_cookie_a_forged_one_and_an_expired_one(
    demo: RunningServer, http: httpx.AsyncClient
) -> None:
    cookie = await login(http, "ada")
    payload, _, mac = cookie.rpartition(".")
    sessions = Sessions(demo.gateway.dev_secret)
    other, _ = sessions.issue("eve")
    expired, _ = sessions.issue("ada", now=time.time() - SESSION_SECONDS - 1)
    signed_elsewhere, _ = Sessions("another secret").issue("ada")
    for cookies in (
        {},
        {COOKIE: ""},
        {COOKIE: f"{payload}.{'0' * len(mac)}"},
        {COOKIE: f"{other.partition('.')[0]}.{mac}"},  # eve's name under ada's signature
        {COOKIE: expired},
        {COOKIE: signed_elsewhere},
        {COOKIE: "not-a-cookie"},
    ):
        reply = await hook(http, "connect", opening(cookies))
        assert reply["result"] == "refuse", cookies
        assert reply["code"] == "unauthorized" and reply["message"], reply


async def test_connect_lets_a_token_speak_for_itself(http: httpx.AsyncClient) -> None:
    claims: dict[str, Any] = {
        "sub": "dev",
        "exp": None,
        "subscribe": ["*"],
        "publish": ["*"],
        "info": {},
    }
    assert await hook(http, "connect", opening({}, claims)) == {"result": "allow"}


# --------------------------------------------------------------------------- publish


async def test_publish_stamps_keeps_and_accepts_a_message(http: httpx.AsyncClient) -> None:
    before = time.time()
    reply = await say(http, "  hello there  ")
    assert reply["result"] == "accept"
    message = reply["data"]
    assert set(message) == {"id", "user", "text", "ts"}
    assert message["user"] == "ada" and message["text"] == "hello there"
    assert before - 0.01 <= message["ts"] <= time.time() + 0.01
    second = (await say(http, "again"))["data"]
    assert second["id"] > message["id"]
    page = await history(http, {"room": "lobby"})
    assert page["data"]["messages"] == [message, second]


@pytest.mark.parametrize("text", ["darn it", "What the HECK?", "frak.", "oh... Darn!"])
async def test_publish_refuses_a_banned_word_and_keeps_nothing(
    http: httpx.AsyncClient, text: str
) -> None:
    reply = await say(http, text)
    assert reply["result"] == "refuse" and reply["code"] == "forbidden"
    assert reply["message"].startswith("please keep it civil")
    assert (await history(http, {"room": "lobby"}))["data"]["messages"] == []


async def test_publish_refuses_words_only_not_their_letters(http: httpx.AsyncClient) -> None:
    reply = await say(http, "darning socks in heckmondwike")
    assert reply["result"] == "accept" and reply["data"]["text"].startswith("darning")


@pytest.mark.parametrize("data", [{"text": ""}, {"text": "  "}, {"text": 5}, {"msg": "hi"}, "hi"])
async def test_publish_refuses_what_is_not_a_chat_message(
    http: httpx.AsyncClient, data: Any
) -> None:
    body = {"channel": ROOM, "user": "ada", "client": "c-1", "data": data}
    reply = await hook(http, "publish", body)
    assert reply["result"] == "refuse" and reply["code"] == "bad_request"


async def test_publish_refuses_a_message_over_the_limit(http: httpx.AsyncClient) -> None:
    assert (await say(http, "x" * MAX_TEXT))["result"] == "accept"
    assert (await say(http, "x" * (MAX_TEXT + 1)))["code"] == "bad_request"


async def test_publish_leaves_other_channels_as_sent(http: httpx.AsyncClient) -> None:
    """Only the demo's rooms: a chat:lobby client with a token is not moderated."""
    assert await say(http, "darn", channel="chat:lobby") == {"result": "accept"}
    assert await say(http, "darn", channel="chat:demo") == {"result": "accept"}
    assert (await history(http, {"room": "lobby"}))["data"]["messages"] == []


# --------------------------------------------------------------------------- rpc


async def test_history_pages_back_through_a_room(http: httpx.AsyncClient) -> None:
    ids = [(await say(http, f"m{i}"))["data"]["id"] for i in range(7)]
    await say(http, "elsewhere", channel="chat:demo-other")

    page = (await history(http, {"room": "lobby", "limit": 3}))["data"]
    assert [m["id"] for m in page["messages"]] == ids[4:] and page["more"] is True
    page = (await history(http, {"room": "lobby", "limit": 3, "before": ids[4]}))["data"]
    assert [m["id"] for m in page["messages"]] == ids[1:4] and page["more"] is True
    page = (await history(http, {"room": "lobby", "limit": 3, "before": ids[1]}))["data"]
    assert [m["id"] for m in page["messages"]] == ids[:1] and page["more"] is False
    assert [m["text"] for m in page["messages"]] == ["m0"]

    other = (await history(http, {"room": "other"}))["data"]
    assert [m["text"] for m in other["messages"]] == ["elsewhere"]
    assert (await history(http, {"room": "empty"}))["data"] == {"messages": [], "more": False}


async def test_history_caps_the_page_size(http: httpx.AsyncClient) -> None:
    for i in range(MAX_PAGE + 2):
        await say(http, f"m{i}")
    page = (await history(http, {"room": "lobby", "limit": 10_000}))["data"]
    assert len(page["messages"]) == MAX_PAGE and page["more"] is True


@pytest.mark.parametrize(
    "data",
    [
        None,
        {},
        {"room": ""},
        {"room": "bad room"},
        {"room": "lobby", "before": 0},
        {"room": "lobby", "before": "3"},
        {"room": "lobby", "limit": -1},
        {"room": "lobby", "limit": True},
    ],
)
async def test_history_refuses_a_bad_request(http: httpx.AsyncClient, data: Any) -> None:
    reply = await history(http, data)
    assert reply["result"] == "refuse" and reply["code"] == "bad_request", reply


async def test_rpc_answers_an_unknown_method_with_not_found(http: httpx.AsyncClient) -> None:
    body = {"method": "chat.typing", "user": "ada", "client": "c-1", "data": None}
    reply = await hook(http, "rpc", body)
    assert reply["result"] == "refuse" and reply["code"] == "not_found"


async def test_a_hook_request_that_is_not_a_json_object_is_a_400(http: httpx.AsyncClient) -> None:
    for name in ("connect", "publish", "rpc"):
        response = await http.post(f"/demo/hooks/{name}", content=b"[1]")
        assert response.status_code == 400, name


async def test_the_backend_is_not_there_without_dev_mode_or_the_demo(make_server: Any) -> None:
    for settings in ({}, {"jwt_secret": "", "demo": False}):
        server = await make_server(**settings)
        async with api_client(server) as client:
            assert (await client.post("/demo/login", json={"name": "ada"})).status_code == 404
            assert (await client.post("/demo/hooks/publish", json={})).status_code == 404


# --------------------------------------------------------------------------- the store


def test_rooms_keep_the_last_messages_of_the_rooms_written_to_last() -> None:
    rooms = Rooms(keep=3, max_rooms=2)
    for i in range(5):
        rooms.add("a", "ada", f"a{i}")
    assert [m["text"] for m in rooms.page("a", None, 10)[0]] == ["a2", "a3", "a4"]
    rooms.add("b", "bob", "b0")
    rooms.add("a", "ada", "a5")  # a is the most recent again
    rooms.add("c", "cy", "c0")  # three rooms: b, written to least recently, goes
    assert rooms.page("b", None, 10) == ([], False)
    assert [m["text"] for m in rooms.page("a", None, 10)[0]] == ["a3", "a4", "a5"]
    last = rooms.add("b", "bob", "b1")
    assert last["id"] == 9  # never an id given before


# --------------------------------------------------------------------------- python -m gateway


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("127.0.0.1", "http://127.0.0.1:8000"),
        ("0.0.0.0", "http://127.0.0.1:8000"),
        ("::", "http://[::1]:8000"),
        ("localhost", "http://localhost:8000"),
        ("fd00::5", "http://[fd00::5]:8000"),
    ],
)
def test_dev_mode_calls_its_hooks_where_this_machine_reaches_the_server(
    host: str, url: str
) -> None:
    assert _local_url(host, 8000) == url


async def cookie_of(url: str, name: str) -> dict[str, str]:
    """The ``Cookie`` header of a session logged in as ``name``."""
    async with httpx.AsyncClient(base_url=url, trust_env=False) as client:
        response = await client.post("/demo/login", json={"name": name})
    assert response.status_code == 200, response.text
    return {"Cookie": f"{COOKIE}={response.cookies[COOKIE]}"}


@contextlib.asynccontextmanager
async def ws_at(url: str, headers: dict[str, str] | None = None) -> AsyncIterator[WsClient]:
    async with connect(url, additional_headers=headers, proxy=None, open_timeout=5) as conn:
        yield WsClient(conn)


async def test_python_m_gateway_in_dev_mode_calls_the_demo_backend(
    dev_gateway: GatewayProcess,
) -> None:
    room = f"chat:demo-{secrets.token_hex(4)}"
    headers = await cookie_of(dev_gateway.url, "ada")
    async with httpx.AsyncClient(base_url=dev_gateway.url, trust_env=False) as client:
        state = (await client.get("/demo/session", headers=headers)).json()
    assert state == {"user": "ada", "connect": "cookie"}

    async with ws_at(f"{dev_gateway.ws_url}/ws", headers) as ws:  # no token
        await ws.subscribe(room)
        presence = await ws.call("presence", channel=room)
        assert [(c["user"], c["info"]) for c in presence["result"]["clients"]] == [
            ("ada", {"name": "ada"})
        ]
        refused = await ws.call("publish", channel=room, data={"text": "Darn."})
        assert refused["ok"] is False and refused["error"]["code"] == "forbidden"
        assert refused["error"]["message"] == 'please keep it civil: "darn" is not allowed'
        await ws.publish(room, {"text": "hi", "user": "mallory", "ts": 1})
        [push] = await ws.publications(room, 1)
        message = push["data"]
        assert (message["user"], message["text"]) == ("ada", "hi") and message["ts"] > 1
        answer = await ws.call("rpc", method=HISTORY_METHOD, data={"room": room[10:]})
        assert answer["result"]["data"] == {"messages": [message], "more": False}
        # The cookie's grant covers the demo's rooms only.
        forbidden = await ws.call("subscribe", channel="demo:ticker")
        assert forbidden["error"]["code"] == "forbidden"


async def test_without_the_cookie_a_connection_without_a_token_is_still_refused(
    dev_gateway: GatewayProcess,
) -> None:
    for headers in (None, {"Cookie": f"{COOKIE}=forged.0000"}):
        async with ws_at(f"{dev_gateway.ws_url}/ws", headers) as ws:
            code, reason, _ = await ws.expect_close()
        assert (code, reason) == (4001, "unauthorized")
    async with httpx.AsyncClient(base_url=dev_gateway.url, trust_env=False) as client:
        response = await client.get("/sse", params={"channel": "chat:demo-x"})
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "unauthorized"
        headers = await cookie_of(dev_gateway.url, "ada")
        async with client.stream(
            "GET", "/sse", params={"channel": "chat:demo-x"}, headers=headers
        ) as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/event-stream")


async def test_token_clients_of_other_channels_publish_as_before(
    dev_gateway: GatewayProcess,
) -> None:
    async with httpx.AsyncClient(base_url=dev_gateway.url, trust_env=False) as client:
        minted = (await client.get("/dev/token", params={"user": "zoe"})).json()["token"]
    data = {"text": "darn", "n": 1}
    async with ws_at(f"{dev_gateway.ws_url}/ws?token={minted}") as ws:
        await ws.subscribe("chat:lobby")
        await ws.publish("chat:lobby", data)
        [push] = await ws.publications("chat:lobby", 1)
    assert push["data"] == data


async def test_a_gateway_hooks_setting_of_the_user_wins() -> None:
    proc = GatewayProcess(env={"GATEWAY_HOOKS": "{}", "GATEWAY_LOG_LEVEL": "warning"})
    try:
        await proc.wait_ready()
        headers = await cookie_of(proc.url, "ada")
        async with httpx.AsyncClient(base_url=proc.url, trust_env=False) as client:
            state = (await client.get("/demo/session", headers=headers)).json()
            minted = (await client.get("/dev/token", params={"user": "zoe"})).json()["token"]
        assert state == {"user": "ada", "connect": "token"}  # the page uses a dev token
        async with ws_at(f"{proc.ws_url}/ws", headers) as ws:
            code, _, _ = await ws.expect_close()
        assert code == 4001  # no connect hook: a token is needed
        async with ws_at(f"{proc.ws_url}/ws?token={minted}") as ws:
            await ws.subscribe("chat:demo-x")
            await ws.publish("chat:demo-x", {"text": "darn"})
            [push] = await ws.publications("chat:demo-x", 1)
        assert push["data"] == {"text": "darn"}  # no publish hook either
    finally:
        proc.stop()
