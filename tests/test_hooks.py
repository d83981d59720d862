"""Backend hooks (GATEWAY_HOOKS), end to end: a real gateway calling a real backend
(tests/fake_backend.py) over HTTP, with WebSocket and SSE clients."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from typing import Any

import orjson
import pytest

from gateway import pooled_http
from gateway.app import create_app
from gateway.hooks import load_hooks
from gateway.settings import Settings
from tests.conftest import SECRET, MakeServer, RunningServer, eventually, free_port, token
from tests.fake_backend import REFUSAL, FakeBackend
from tests.helpers import api_client, open_sse, sse_params, sse_request, ws_client


@pytest.fixture
async def hooked(make_server: MakeServer, backend: FakeBackend) -> RunningServer:
    """A gateway whose hooks (timeout 1 s) go to ``backend`` for ``chat:*`` and ``private:*``."""
    return await make_server(hooks=backend.hooks(subscribe=1, publish=1))


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("raw", "complaint"),
    [
        ("{not json", "not valid JSON"),
        ('["subscribe"]', "must be a JSON object"),
        ('{"accept": {"url": "http://app/h", "channels": ["*"]}}', "unknown hook 'accept'"),
        ('{"connect": {"url": "http://app/h", "channels": ["*"]}}', "unknown key 'channels'"),
        ('{"publish": {"url": "http://app/h", "channels": ["*"], "tmeout": 1}}', "'tmeout'"),
        ('{"connect": {"url": "http://app/h", "headers": "cookie"}}', "'headers' must be"),
        ('{"connect": {"url": "http://app/h", "with_token": "no"}}', "'with_token' must be"),
        ('{"rpc": {"url": "http://app/h", "methods": []}}', "needs 'methods'"),
        ('{"subscribe": {"channels": ["*"]}}', "needs an http(s) 'url'"),
        ('{"subscribe": {"url": "ftp://app/h", "channels": ["*"]}}', "needs an http(s) 'url'"),
        ('{"publish": {"url": "http://app/h"}}', "needs 'channels'"),
        ('{"publish": {"url": "http://app/h", "channels": "chat:*"}}', "needs 'channels'"),
        ('{"publish": {"url": "http://app/h", "channels": [""]}}', "needs 'channels'"),
        ('{"publish": {"url": "http://app/h", "channels": ["*"], "timeout": 0}}', "timeout"),
        ('{"publish": "http://app/h"}', "must be an object"),
    ],
)
def test_a_bad_hooks_setting_is_a_start_up_error_naming_the_problem(
    raw: str, complaint: str
) -> None:
    with pytest.raises(ValueError, match="GATEWAY_HOOKS") as caught:
        create_app(Settings(jwt_secret=SECRET, demo=False, hooks=raw))
    assert complaint in str(caught.value)


def test_the_documented_example_parses() -> None:
    hooks = load_hooks(
        '{"subscribe": {"url": "http://app/hooks/subscribe", "channels": ["private:*"],'
        ' "timeout": 2}, "publish": {"url": "http://app/hooks/publish",'
        ' "channels": ["chat:*"], "timeout": 2}}'
    )
    assert sorted(hooks) == ["publish", "subscribe"]
    assert hooks["subscribe"].channels("private:x") and not hooks["subscribe"].channels("chat:x")
    assert hooks["publish"].timeout == 2.0
    assert load_hooks("{}") == {}


# --------------------------------------------------------------------------- subscribe


async def test_subscribe_hook_allows_with_channel_user_client_and_claims(hooked, backend):
    async with (
        ws_client(hooked, token("alice", info={"name": "Alice"})) as c,
        api_client(hooked) as http,
    ):
        result = await c.subscribe("private:allow.1")
        assert result["recovered"] is False
        [call] = backend.calls_of("subscribe")
        assert call["channel"] == "private:allow.1"
        assert call["user"] == "alice"
        assert isinstance(call["client"], str) and call["client"].startswith("c-")
        assert call["claims"]["sub"] == "alice"
        assert call["claims"]["info"] == {"name": "Alice"}
        # The subscription is live.
        await http.post(
            "/api/publish",
            json={"channel": "private:allow.1", "data": {"n": 1}},
            headers={"Authorization": f"Bearer {token('backend')}"},
        )
        [push] = await c.publications("private:allow.1", 1)
        assert push["data"] == {"n": 1}
        # Subscribed already: the hub's answer, the backend not asked again for nothing.
        again = await c.call("subscribe", channel="private:allow.1")
        assert again["error"]["code"] == "bad_request", again
        assert "already subscribed" in again["error"]["message"], again
        assert len(backend.calls_of("subscribe")) == 1


@pytest.mark.parametrize(
    ("channel", "code"),
    [
        ("private:refuse.1", "forbidden"),
        ("private:refusecode.1", "not_found"),
        ("private:refusebogus.1", "forbidden"),
    ],
)
async def test_subscribe_hook_refusal_is_the_clients_error(hooked, backend, channel, code):
    async with ws_client(hooked) as c:
        reply = await c.call("subscribe", channel=channel)
        assert reply["ok"] is False
        assert reply["error"] == {"code": code, "message": REFUSAL}
        assert hooked.gateway.hub.subscription_count == 0
        assert len(backend.calls_of("subscribe", channel)) == 1
        await c.ping_ok()


async def test_token_permission_is_checked_before_the_hook(hooked, backend):
    async with ws_client(hooked, token("bob", subscribe=["news"])) as c:
        reply = await c.call("subscribe", channel="private:allow.2")
        assert reply["error"]["code"] == "forbidden"
        assert "token does not allow" in reply["error"]["message"]
    assert backend.calls_of("subscribe") == []


async def test_a_channel_past_the_connections_limit_is_not_put_to_the_backend(make_server, backend):
    """The backend is asked only of a subscribe the gateway would then make: at the
    channel limit it was asked (and may have recorded a member) before the client got
    ``limit_exceeded``."""
    server = await make_server(hooks=backend.hooks(subscribe=1), max_channels_per_connection=1)
    async with ws_client(server) as c:
        await c.subscribe("private:allow.1")
        reply = await c.call("subscribe", channel="private:allow.2")
        assert reply["error"]["code"] == "limit_exceeded"
    assert [call["channel"] for call in backend.calls_of("subscribe")] == ["private:allow.1"]


async def test_hooked_subscribes_count_toward_the_connections_rate_as_an_rpc_does(
    make_server, backend
):
    """Each is a call to the backend: subscribing and unsubscribing in a loop cost the
    backend a request each time, with no bound. Past the rate, ``rate_limited`` and no
    call; a channel no hook decides is not counted."""
    server = await make_server(hooks=backend.hooks(subscribe=1), client_publish_rate=2)
    async with ws_client(server) as c:
        for _ in range(2):  # the burst: the rate's worth
            await c.subscribe("private:allow.1")
            assert (await c.call("unsubscribe", channel="private:allow.1"))["ok"] is True
        reply = await c.call("subscribe", channel="private:allow.1")
        assert reply["error"] == {"code": "rate_limited", "message": "subscribing too fast"}
        await c.subscribe("news")  # no hook: not counted
    assert len(backend.calls_of("subscribe")) == 2


async def test_sse_stream_asks_the_subscribe_hook(hooked, backend):
    async with api_client(hooked) as http:
        async with open_sse(http, ["private:allow.3", "news"], token("carol")) as stream:
            await stream.event()  # the opening
        assert [c["channel"] for c in backend.calls_of("subscribe")] == ["private:allow.3"]
        assert backend.calls_of("subscribe")[0]["user"] == "carol"


async def test_sse_refused_by_the_hook_is_a_403_before_any_stream(hooked, backend):
    async with api_client(hooked) as http:
        status, _, body = await sse_request(
            http, sse_params(["news", "private:refuse.2"], token("carol"))
        )
    assert status == 403
    assert body == {"error": {"code": "forbidden", "message": REFUSAL}}
    hub = hooked.gateway.hub
    assert hub.subscription_count == 0
    await eventually(lambda: not hub.sessions)


async def test_sse_hook_failure_is_a_500_internal(hooked, backend):
    async with api_client(hooked) as http:
        status, _, body = await sse_request(http, sse_params(["private:http500.1"], token()))
    assert status == 500
    assert body["error"]["code"] == "internal"
    assert "subscribe hook failed" in body["error"]["message"]


# --------------------------------------------------------------------------- publish


async def test_publish_hook_accepts_data_as_is(hooked, backend):
    async with ws_client(hooked) as pub, ws_client(hooked) as sub:
        await sub.subscribe("chat:ok.1")
        result = await pub.publish("chat:ok.1", {"text": "hi"})
        assert result["offset"] == 1 and isinstance(result["epoch"], str)
        [push] = await sub.publications("chat:ok.1", 1)
        assert push["data"] == {"text": "hi"}
        [call] = backend.calls_of("publish")
        assert call["channel"] == "chat:ok.1" and call["data"] == {"text": "hi"}
        assert call["user"] == "alice" and call["client"].startswith("c-")


async def test_publish_hook_rewrite_is_what_subscribers_receive_once(hooked, backend):
    async with ws_client(hooked) as pub, ws_client(hooked) as sub:
        await sub.subscribe("chat:rewrite.1")
        first = await pub.publish("chat:rewrite.1", {"text": "one"})
        second = await pub.publish("chat:rewrite.1", {"text": "two"})
        assert (first["offset"], second["offset"]) == (1, 2)
        pushes = await sub.publications("chat:rewrite.1", 2)
        assert [(p["offset"], p["data"]) for p in pushes] == [
            (1, {"rewritten": {"text": "one"}}),
            (2, {"rewritten": {"text": "two"}}),
        ]
    async with api_client(hooked) as http:
        r = await http.get(
            "/api/channels/chat:rewrite.1/history",
            headers={"Authorization": f"Bearer {token('backend')}"},
        )
    assert [p["data"] for p in r.json()["publications"]] == [
        {"rewritten": {"text": "one"}},
        {"rewritten": {"text": "two"}},
    ]


async def test_publish_hook_refusal_is_forbidden_and_publishes_nothing(hooked, backend):
    async with ws_client(hooked) as pub:
        reply = await pub.call("publish", channel="chat:refuse.1", data={"text": "spam"})
        assert reply["error"] == {"code": "forbidden", "message": REFUSAL}
        # Nothing was published: the next accepted publication elsewhere is unaffected, and
        # the refused channel has no history.
        async with api_client(hooked) as http:
            r = await http.get(
                "/api/channels/chat:refuse.1/history",
                headers={"Authorization": f"Bearer {token('backend')}"},
            )
        assert r.json()["publications"] == []
        await pub.ping_ok()


async def test_channels_outside_the_patterns_never_call_the_hooks(hooked, backend):
    async with ws_client(hooked) as c:
        await c.subscribe("news")
        await c.publish("news", {"n": 1})
        [push] = await c.publications("news", 1)
        assert push["data"] == {"n": 1}
        await c.subscribe("chatroom")
    async with api_client(hooked) as http, open_sse(http, ["news"]) as stream:
        await stream.event()
    assert backend.calls == []


# --------------------------------------------------------------------------- failures


@pytest.mark.parametrize(
    ("kind", "problem"),
    [
        ("hang", "no answer within 1s"),
        ("http500", "HTTP 500"),
        ("badjson", "not JSON"),
        ("unknown", "unknown result 'maybe'"),
        # a reply orjson reads and the gateway could not write (its info, its data): a
        # bad reply, where it was a 1011 (rpc), an unexplained internal error (publish) or
        # a channel left half subscribed ("already subscribed" to the retry)
        ("deep", "the reply is nested too deeply"),
        # one that orjson writes whole, but not inside the client's reply (an rpc's
        # connection closed 1011; a subscribe half done, and other subscribers of the
        # channel waiting on it for good)
        ("edge", "the reply is nested too deeply"),
        # read and parsed on the worker's loop: 100 MB was taken whole
        ("toobig", "the reply is over 1 MiB"),
    ],
)
@pytest.mark.parametrize("op", ["subscribe", "publish"])
async def test_a_failing_hook_is_an_internal_error_and_the_client_goes_on(
    hooked, backend, op, kind, problem
):
    channel = f"chat:{kind}.1"
    async with ws_client(hooked) as c:
        fields: dict[str, Any] = {"channel": channel}
        if op == "publish":
            fields["data"] = {"n": 1}
        started = time.monotonic()
        reply = await c.call(op, timeout=10, **fields)
        assert time.monotonic() - started < 8  # bounded by the hook's 1 s timeout, not hung
        assert reply["ok"] is False
        assert reply["error"]["code"] == "internal"
        assert f"{op} hook failed" in reply["error"]["message"]
        assert problem in reply["error"]["message"]
        assert len(backend.calls_of(op, channel)) == 1
        # The same client's next commands work, the same one again too (nothing half done).
        await c.ping_ok()
        await c.subscribe("news")
        again = await c.call(op, timeout=10, **fields)
        assert again["error"] == reply["error"], again


async def test_a_backend_that_is_down_is_an_internal_error(make_server):
    dead = f"http://127.0.0.1:{free_port()}/hooks"
    hooks = {
        name: {"url": f"{dead}/{name}", "channels": ["chat:*"], "timeout": 2}
        for name in ("subscribe", "publish")
    }
    gw = await make_server(hooks=orjson.dumps(hooks).decode())
    async with ws_client(gw) as c:
        for op, extra in (("subscribe", {}), ("publish", {"data": 1})):
            reply = await c.call(op, channel="chat:lobby", timeout=10, **extra)
            assert reply["error"]["code"] == "internal", reply
            assert f"{op} hook failed" in reply["error"]["message"]
        await c.ping_ok()


async def test_a_backend_that_is_down_is_not_a_log_line_per_call(make_server, caplog):
    """Every connect of a reconnect storm through a hook whose backend is down failed
    with two warnings; now a line of each kind a while, then how many were held back."""
    dead = f"http://127.0.0.1:{free_port()}/hooks/subscribe"
    hooks = {"subscribe": {"url": dead, "channels": ["chat:*"], "timeout": 2}}
    gw = await make_server(hooks=orjson.dumps(hooks).decode())
    with caplog.at_level(logging.WARNING, logger="gateway.hooks"):
        async with ws_client(gw) as c:
            for i in range(20):
                reply = await c.call("subscribe", channel=f"chat:down.{i}", timeout=10)
                assert reply["error"]["code"] == "internal", reply
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.hooks"]
    assert len(lines) == 2, lines
    assert lines[0].startswith("subscribe hook: ClientConnectorError"), lines
    assert lines[1] == "subscribe hook failed: the backend could not be reached", lines


async def test_rpc_calls_holding_every_connection_of_their_pool_starve_no_other_hook(
    make_server, backend, monkeypatch
):
    """Every hook shared one pool (256 connections): that many slow rpc calls at once,
    from any clients, left a subscribe's or a connect's hook call waiting for a
    connection until its timeout ("no answer within 1s", the backend never asked).
    Each hook has a pool of its own; here of 2 connections, both held by rpc calls."""
    monkeypatch.setattr(pooled_http, "CONNECTIONS", 2)
    gw = await make_server(hooks=backend.hooks(subscribe=1, rpc=30))
    async with ws_client(gw) as one, ws_client(gw) as two, ws_client(gw) as other:
        for c in (one, two):
            await c.send({"id": c.next_id(), "op": "rpc", "method": "rpc:hang", "data": 1})
        await eventually(lambda: backend.pending == 2)
        reply = await other.call("subscribe", channel="private:allow.9", timeout=10)
        assert reply["ok"] is True, reply
        backend.release.set()


class UnaskedAnswers:
    """A backend answering each hook call with ``{"result": "allow", "info": {"n": N}}``,
    N counting the calls, and then, on the same kept-alive connection, an answer nobody
    asked for (``{"stale": true}``), as a broken backend or proxy might."""

    def __init__(self) -> None:
        self.calls = 0
        self.unasked = asyncio.Event()
        self.connections = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?i)content-length: *(\d+)", head)
                assert length is not None, head
                await reader.readexactly(int(length[1]))
                self.calls += 1
                writer.write(self.answer({"n": self.calls}))
                await writer.drain()
                await asyncio.sleep(0.05)
                writer.write(self.answer({"stale": True}))
                await writer.drain()
                self.unasked.set()
        writer.close()

    @staticmethod
    def answer(info: dict[str, Any]) -> bytes:
        body = orjson.dumps({"result": "allow", "info": info})
        head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
        return head % len(body) + body


async def test_an_answer_no_call_asked_for_is_never_another_calls_answer(make_server):
    """aiohttp kept a kept-alive connection's unasked answer and gave it to the next call
    on that connection: one client's subscribe was answered with what the backend sent
    nobody (with a connect hook, a login admitted as another user)."""
    backend = UnaskedAnswers()
    server = await asyncio.start_server(backend.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    hooks = {"subscribe": {"url": f"http://127.0.0.1:{port}/h", "channels": ["private:*"]}}
    try:
        gw = await make_server(hooks=orjson.dumps(hooks).decode())
        async with ws_client(gw) as c:
            first = await c.subscribe("private:one")
            assert first["info"] == {"n": 1}
            await asyncio.wait_for(backend.unasked.wait(), 5)
            second = await c.subscribe("private:two")
            assert second["info"] == {"n": 2}, second  # not {"stale": true}
        assert backend.connections == 2  # the first connection was not used again
    finally:
        server.close()


async def test_a_hung_publish_hook_delays_no_other_channel(make_server, backend):
    gw = await make_server(hooks=backend.hooks(publish=30))
    async with ws_client(gw) as stuck, ws_client(gw) as pub, ws_client(gw) as sub:
        await sub.subscribe("chat:ok.2")
        await sub.subscribe("news")
        cmd_id = stuck.next_id()
        await stuck.send({"id": cmd_id, "op": "publish", "channel": "chat:hang.2", "data": 1})
        await eventually(lambda: backend.pending == 1)
        # While that call is pending, another client's publications fan out, on a hooked
        # channel and on another one.
        await pub.publish("chat:ok.2", {"n": 1})
        await pub.publish("news", {"n": 2})
        [hooked_push] = await sub.publications("chat:ok.2", 1)
        [plain_push] = await sub.publications("news", 1)
        assert (hooked_push["data"], plain_push["data"]) == ({"n": 1}, {"n": 2})
        assert backend.pending == 1  # still hung
        backend.release.set()
        reply = await stuck.reply(cmd_id)
        assert reply["ok"] is True and reply["result"]["offset"] == 1


# --------------------------------------------------------------------------- metrics


async def test_hook_calls_are_measured_by_hook_and_outcome(hooked, backend):
    async with ws_client(hooked) as c:
        await c.subscribe("private:allow.9")
        await c.call("subscribe", channel="private:refuse.9")
        await c.call("publish", channel="chat:http500.9", data=1)
    async with api_client(hooked) as http:
        text = (await http.get("/metrics")).text
    assert 'gateway_hook_outcomes_total{hook="subscribe",outcome="allow"} 1.0' in text
    assert 'gateway_hook_outcomes_total{hook="subscribe",outcome="refuse"} 1.0' in text
    assert 'gateway_hook_outcomes_total{hook="publish",outcome="bad_status"} 1.0' in text
    assert 'gateway_hook_seconds_count{hook="subscribe"} 2.0' in text
    assert 'gateway_hook_seconds_count{hook="publish"} 1.0' in text
