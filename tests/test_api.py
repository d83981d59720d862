"""The backend HTTP API and the operational endpoints."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from auth.tokens import make_token
from tests.conftest import SECRET, eventually, token
from tests.helpers import (
    api_client,
    api_history,
    api_publish,
    bearer,
    open_sse,
    poll,
    ws_client,
)
from tests.redis_server import RedisServer

OTHER_SECRET = "another-secret-0123456789abcdef0123456789abcdef"


def assert_error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].split(";")[0] == "application/json", r.headers
    body = r.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), body
    assert body == {"error": {"code": code, "message": body["error"]["message"]}}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


# --------------------------------------------------------------------------- publish


async def test_publish_returns_offset_and_epoch(server):
    async with api_client(server) as http:
        r = await http.post(
            "/api/publish", json={"channel": "prices", "data": {"bid": 1.01}}, headers=bearer()
        )
        assert r.status_code == 200
        assert r.headers["content-type"].split(";")[0] == "application/json"
        body = r.json()
        assert body == {"offset": 1, "epoch": body["epoch"]}
        assert isinstance(body["epoch"], str) and body["epoch"]
        r2 = await http.post(
            "/api/publish", json={"channel": "prices", "data": 2}, headers=bearer()
        )
        assert r2.json() == {"offset": 2, "epoch": body["epoch"]}
        # Channels count independently.
        assert (await api_publish(http, "other", 1))["offset"] == 1


async def test_publish_is_delivered_to_ws_and_sse_subscribers(server):
    async with api_client(server) as http, ws_client(server) as c, open_sse(http, ["prices"]) as s:
        await c.subscribe("prices")
        await s.event()  # opening block
        r = await api_publish(http, "prices", {"bid": 1})
        push = {"channel": "prices", "offset": 1, "epoch": r["epoch"], "data": {"bid": 1}}
        assert await c.recv() == push
        [e] = await s.publications(1)
        assert e["json"] == push


@pytest.mark.parametrize(
    "data",
    [None, 0, "s", [1, 2], {"a": {"b": [True, None]}}, "é😀"],
    ids=["null", "zero", "string", "list", "nested", "unicode"],
)
async def test_publish_keeps_any_json_value(server, data):
    async with api_client(server) as http:
        r = await api_publish(http, "v", data)
        assert await api_history(http, "v") == {
            "publications": [{"offset": 1, "data": data}],
            "offset": 1,
            "epoch": r["epoch"],
        }


# --------------------------------------------------------------------------- broadcast


async def test_broadcast_returns_results_in_request_order(server):
    async with api_client(server) as http, ws_client(server) as c:
        for ch in ("b2", "b3"):
            await c.subscribe(ch)
        await api_publish(http, "b2", "earlier")
        await api_publish(http, "b2", "earlier")
        r = await http.post(
            "/api/broadcast",
            json={"channels": ["b3", "b1", "b2"], "data": {"x": 1}},
            headers=bearer(),
        )
        assert r.status_code == 200
        body = r.json()
        results = body["results"]
        assert body == {
            "results": [
                {"channel": "b3", "offset": 1, "epoch": results[0]["epoch"]},
                {"channel": "b1", "offset": 1, "epoch": results[1]["epoch"]},
                {"channel": "b2", "offset": 3, "epoch": results[2]["epoch"]},
            ]
        }
        got: dict[str, dict[str, Any]] = {}
        while len(got) < 2:
            f = await c.recv()
            if f.get("data") == {"x": 1}:
                got[f["channel"]] = f
        assert got == {
            "b2": {"channel": "b2", "offset": 3, "epoch": results[2]["epoch"], "data": {"x": 1}},
            "b3": {"channel": "b3", "offset": 1, "epoch": results[0]["epoch"], "data": {"x": 1}},
        }
        h = await api_history(http, "b1")
        assert h == {
            "publications": [{"offset": 1, "data": {"x": 1}}],
            "offset": 1,
            "epoch": results[1]["epoch"],
        }


async def test_broadcast_with_a_forbidden_channel_is_403_and_publishes_nothing(server):
    tok = token("backend", publish=["ok:*"])
    async with api_client(server) as http:
        r = await http.post(
            "/api/broadcast",
            json={"channels": ["ok:1", "secret", "ok:2"], "data": 1},
            headers=bearer(tok),
        )
        assert_error(r, 403, "forbidden")
        for ch in ("ok:1", "ok:2", "secret"):
            assert (await api_history(http, ch))["offset"] == 0


async def test_broadcast_with_an_invalid_channel_is_400_and_publishes_nothing(server):
    async with api_client(server) as http:
        r = await http.post(
            "/api/broadcast", json={"channels": ["fine", "not fine"], "data": 1}, headers=bearer()
        )
        assert_error(r, 400, "bad_request")
        assert (await api_history(http, "fine"))["offset"] == 0


@pytest.mark.parametrize(
    "body",
    [
        {"data": 1},
        {"channels": "a", "data": 1},
        {"channels": [1, 2], "data": 1},
        {"channels": ["a"]},
        [],
    ],
    ids=["no_channels", "channels_string", "channels_not_strings", "no_data", "array"],
)
async def test_broadcast_with_bad_body_is_400(server, body):
    async with api_client(server) as http:
        r = await http.post("/api/broadcast", json=body, headers=bearer())
        assert_error(r, 400, "bad_request")


# --------------------------------------------------------------------------- history, presence


async def test_history_since_offset_returns_later_publications_oldest_first(server):
    async with api_client(server) as http:
        results = [await api_publish(http, "h", {"n": n}) for n in range(1, 11)]
        epoch = results[0]["epoch"]
        r = await http.get("/api/channels/h/history", params={"since_offset": 6}, headers=bearer())
        assert r.status_code == 200
        assert r.json() == {
            "publications": [{"offset": n, "data": {"n": n}} for n in range(7, 11)],
            "offset": 10,
            "epoch": epoch,
        }
        r = await http.get("/api/channels/h/history", params={"since_offset": 10}, headers=bearer())
        assert r.json() == {"publications": [], "offset": 10, "epoch": epoch}


async def test_history_limit_returns_the_last_publications_oldest_first(server):
    async with api_client(server) as http:
        results = [await api_publish(http, "h", n) for n in range(1, 11)]
        r = await http.get("/api/channels/h/history", params={"limit": 3}, headers=bearer())
        assert r.status_code == 200
        assert r.json() == {
            "publications": [{"offset": n, "data": n} for n in (8, 9, 10)],
            "offset": 10,
            "epoch": results[0]["epoch"],
        }


async def test_history_since_offset_and_limit_stay_inside_the_range_oldest_first(server):
    async with api_client(server) as http:
        for n in range(1, 11):
            await api_publish(http, "h", n)
        r = await http.get(
            "/api/channels/h/history", params={"since_offset": 4, "limit": 3}, headers=bearer()
        )
        assert r.status_code == 200
        offsets = [p["offset"] for p in r.json()["publications"]]
        assert len(offsets) == 3
        assert (
            offsets == sorted(offsets)
            and offsets[0] > 4
            and offsets == list(range(offsets[0], offsets[0] + 3))
        )


async def test_history_of_unknown_channel_is_empty(server):
    async with api_client(server) as http:
        body = await api_history(http, "never-used")
        assert body == {"publications": [], "offset": 0, "epoch": body["epoch"]}


async def test_presence_lists_clients_on_presence_channel(server):
    async with (
        api_client(server) as http,
        ws_client(server, token("alice", info={"a": 1})) as a,
        ws_client(server, token("bob")) as b,
    ):
        await a.subscribe("chat:api")
        ja = await a.presence_push("chat:api", "join", user="alice")
        await b.subscribe("chat:api")
        jb = await b.presence_push("chat:api", "join", user="bob")
        r = await http.get("/api/channels/chat:api/presence", headers=bearer())
        assert r.status_code == 200
        assert sorted(r.json()["clients"], key=lambda e: e["user"]) == [ja["client"], jb["client"]]
        assert set(r.json()) == {"clients"}
        assert ja["client"]["info"] == {"a": 1}
    async with api_client(server) as http:

        async def empty() -> bool:
            r = await http.get("/api/channels/chat:api/presence", headers=bearer())
            return bool(r.json() == {"clients": []})

        await poll(empty)


async def test_presence_of_channel_without_subscribers_is_empty(server):
    async with api_client(server) as http:
        r = await http.get("/api/channels/chat:nobody/presence", headers=bearer())
        assert r.status_code == 200
        assert r.json() == {"clients": []}


async def test_presence_on_non_presence_channel_is_404_not_found(server):
    async with api_client(server) as http:
        r = await http.get("/api/channels/prices/presence", headers=bearer())
        assert_error(r, 404, "not_found")


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"", b"[]", b'"x"', b"null", b'{"channel": "x", "data": 1'],
    ids=["malformed", "empty", "array", "string", "null", "truncated"],
)
async def test_publish_bad_json_is_400(server, content):
    async with api_client(server) as http:
        r = await http.post(
            "/api/publish",
            content=content,
            headers={**bearer(), "Content-Type": "application/json"},
        )
        assert_error(r, 400, "bad_request")


@pytest.mark.parametrize(
    "body",
    [
        {"data": 1},
        {"channel": "x"},
        {"channel": 5, "data": 1},
        {"channel": None, "data": 1},
        {"channel": ["x"], "data": 1},
    ],
    ids=["no_channel", "no_data", "channel_number", "channel_null", "channel_list"],
)
async def test_publish_missing_or_wrong_fields_is_400(server, body):
    async with api_client(server) as http:
        r = await http.post("/api/publish", json=body, headers=bearer())
        assert_error(r, 400, "bad_request")


@pytest.mark.parametrize("name", ["a b", "a/b", "", "é", "x" * 129, "chat:*", "abc\n"])
async def test_publish_invalid_channel_is_400(server, name):
    async with api_client(server) as http:
        r = await http.post("/api/publish", json={"channel": name, "data": 1}, headers=bearer())
        assert_error(r, 400, "bad_request")


# "a%2Fb" (a slash: "a/b") and "" (an empty segment) matched no route, a 404.
@pytest.mark.parametrize("name", ["a%20b", "%C3%A9", "x" * 129, "a*b", "abc%0A", "a%2Fb", ""])
async def test_history_and_presence_invalid_channel_is_400(server, name):
    async with api_client(server) as http:
        for what in ("history", "presence"):
            r = await http.get(f"/api/channels/{name}/{what}", headers=bearer())
            assert_error(r, 400, "bad_request")


@pytest.mark.parametrize(
    "params",
    [
        {"since_offset": "abc"},
        {"limit": "x"},
        {"since_offset": "1.5"},
        {"since_offset": "-1"},
        # Only decimal digits, as a WebSocket's since and a stream's cursor take them:
        # pydantic alone took these as 1, 1, 10 and 1.
        {"since_offset": "+1"},
        {"limit": " 1"},
        {"limit": "1_0"},
        {"since_offset": "\u0661"},  # an Arabic-Indic one: a digit to str.isdigit()
        # Offsets are signed 64-bit integers; 5,000 digits is past int()'s own limit.
        {"since_offset": str(2**63)},
        {"limit": "9" * 5000},
    ],
    ids=[
        "since_text",
        "limit_text",
        "since_float",
        "since_negative",
        "since_plus",
        "limit_space",
        "limit_underscore",
        "since_other_digit",
        "since_2_63",
        "limit_5000_digits",
    ],
)
async def test_history_bad_query_parameters_are_400(server, params):
    async with api_client(server) as http:
        r = await http.get("/api/channels/h/history", params=params, headers=bearer())
        assert_error(r, 400, "bad_request")


async def test_history_takes_the_highest_offset_and_leading_zeros(server):
    async with api_client(server) as http:
        await api_publish(http, "h", {"n": 1})
        r = await http.get(
            "/api/channels/h/history", params={"since_offset": str(2**63 - 1)}, headers=bearer()
        )
        assert r.status_code == 200 and r.json()["publications"] == []
        params = {"since_offset": "00", "limit": "01"}
        r = await http.get("/api/channels/h/history", params=params, headers=bearer())
        assert [p["data"] for p in r.json()["publications"]] == [{"n": 1}]


def _bad_auth(kind: str) -> dict[str, str]:
    if kind == "missing":
        return {}
    if kind == "garbage":
        return {"Authorization": "Bearer garbage"}
    if kind == "bearer_without_token":
        return {"Authorization": "Bearer"}
    if kind == "basic":
        return {"Authorization": "Basic dXNlcjpwYXNz"}
    if kind == "other_secret":
        return bearer(token("eve", secret=OTHER_SECRET))
    if kind == "expired":
        return bearer(token("eve", ttl=-60))
    raise AssertionError(kind)


BAD_AUTH = ["missing", "garbage", "bearer_without_token", "basic", "other_secret", "expired"]


@pytest.mark.parametrize("kind", BAD_AUTH)
async def test_bad_or_missing_token_is_401_on_every_api_endpoint(server, kind):
    headers = _bad_auth(kind)
    async with api_client(server) as http:
        responses = [
            await http.post("/api/publish", json={"channel": "x", "data": 1}, headers=headers),
            await http.post("/api/broadcast", json={"channels": ["x"], "data": 1}, headers=headers),
            await http.get("/api/channels/x/history", headers=headers),
            await http.get("/api/channels/chat:x/presence", headers=headers),
        ]
        for r in responses:
            assert_error(r, 401, "unauthorized")
        assert (await api_history(http, "x"))["offset"] == 0


async def test_publish_not_allowed_by_claims_is_403(server):
    async with api_client(server) as http:
        for tok in (
            token("b", publish=[]),
            token("b", publish=["chat:*"]),
            make_token(SECRET, "bare"),
        ):
            r = await http.post(
                "/api/publish", json={"channel": "prices", "data": 1}, headers=bearer(tok)
            )
            assert_error(r, 403, "forbidden")
            r = await http.post(
                "/api/broadcast", json={"channels": ["prices"], "data": 1}, headers=bearer(tok)
            )
            assert_error(r, 403, "forbidden")
        assert (await api_history(http, "prices"))["offset"] == 0
        ok = await http.post(
            "/api/publish",
            json={"channel": "chat:x", "data": 1},
            headers=bearer(token("b", publish=["chat:*"])),
        )
        assert ok.status_code == 200


async def test_history_and_presence_need_the_subscribe_claim(server):
    tok = token("b", subscribe=["other:*"], publish=["*"])
    async with api_client(server) as http:
        assert_error(
            await http.get("/api/channels/h/history", headers=bearer(tok)), 403, "forbidden"
        )
        assert_error(
            await http.get("/api/channels/chat:x/presence", headers=bearer(tok)), 403, "forbidden"
        )
        r = await http.get("/api/channels/other:1/history", headers=bearer(tok))
        assert r.status_code == 200


async def test_publish_body_over_max_message_bytes_is_413(make_server):
    server = await make_server(max_message_bytes=1024)
    async with api_client(server) as http:
        r = await http.post(
            "/api/publish", json={"channel": "big", "data": "x" * 2000}, headers=bearer()
        )
        assert_error(r, 413, "too_large")
        r = await http.post(
            "/api/broadcast", json={"channels": ["big"], "data": "x" * 2000}, headers=bearer()
        )
        assert_error(r, 413, "too_large")
        assert (await api_history(http, "big"))["offset"] == 0
        ok = await http.post(
            "/api/publish", json={"channel": "big", "data": "x" * 500}, headers=bearer()
        )
        assert ok.status_code == 200


async def test_publish_chunked_body_over_max_message_bytes_is_413(make_server):
    server = await make_server(max_message_bytes=1024)

    async def body() -> AsyncIterator[bytes]:
        yield b'{"channel": "big", "data": "'
        for _ in range(10):
            yield b"x" * 500
        yield b'"}'

    async with api_client(server) as http:
        r = await http.post(
            "/api/publish", content=body(), headers={**bearer(), "Content-Type": "application/json"}
        )
        assert_error(r, 413, "too_large")


# --------------------------------------------------------------------------- operations


async def test_healthz_and_readyz_are_200(server):
    async with api_client(server) as http:
        assert (await http.get("/healthz")).status_code == 200
        assert (await http.get("/readyz")).status_code == 200


async def test_probes_answer_head_and_a_wrong_method_is_405_naming_the_allowed_ones(server):
    """HEAD on the probes and metrics (a status alone, no body); a method a path does
    not take is a 405 with ``Allow`` (RFC 9110) and the contract's error body."""
    async with api_client(server) as http:
        for path in ["/healthz", "/readyz", "/metrics"]:
            r = await http.head(path)
            assert (r.status_code, r.content) == (200, b""), path
        for method, path, allowed in [
            ("POST", "/healthz", "GET, HEAD"),
            ("DELETE", "/metrics", "GET, HEAD"),
            ("GET", "/api/publish", "POST"),
            ("POST", "/sse", "GET"),
            ("HEAD", "/sse", "GET"),
        ]:
            r = await http.request(method, path, headers=bearer())
            named = {m.strip() for m in r.headers.get("allow", "").split(",")}
            assert (r.status_code, named) == (405, set(allowed.split(", "))), (method, path)
            if method != "HEAD":
                assert r.json()["error"]["code"] == "bad_request", (method, path)


def _families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def _total(
    families: dict[str, Any], word: str, *, kinds: tuple[str, ...] = ("counter", "gauge")
) -> float:
    total = 0.0
    for name, fam in families.items():
        if name.startswith("gateway_") and word in name and fam.type in kinds:
            for s in fam.samples:
                if not s.name.endswith("_created"):
                    total += s.value
    return total


async def test_metrics_are_prometheus_text_with_gateway_families_that_move(server):
    async with api_client(server) as http:
        r = await http.get("/metrics")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/plain")
        before = _families(r.text)
        names = [n for n in before if n.startswith("gateway_")]
        assert any("connection" in n for n in names), names
        assert any("publication" in n for n in names), names
        assert any("deliver" in n for n in names), names
        assert any(
            fam.type == "histogram" for n, fam in before.items() if n.startswith("gateway_")
        ), names

        async with ws_client(server) as c, open_sse(http, ["m"]) as s:
            await c.subscribe("m")
            await s.event()
            during = _families((await http.get("/metrics")).text)
            conn_samples = [
                smp
                for n, fam in during.items()
                if n.startswith("gateway_") and "connection" in n and fam.type == "gauge"
                for smp in fam.samples
            ]
            transports = {v for smp in conn_samples if smp.value >= 1 for v in smp.labels.values()}
            assert {"ws", "sse"} <= transports or {"websocket", "sse"} <= transports, conn_samples

            for n in range(5):
                await api_publish(http, "m", n)
            await c.publications("m", 5)
            await s.publications(5)
            after = _families((await http.get("/metrics")).text)
        assert _total(after, "publication") >= _total(before, "publication") + 5
        assert _total(after, "deliver") >= _total(before, "deliver") + 10


async def test_metrics_count_slow_consumer_closes_family_exists(server):
    async with api_client(server) as http:
        fams = _families((await http.get("/metrics")).text)
        assert any(n.startswith("gateway_") and "slow" in n for n in fams), list(fams)


async def test_metrics_have_the_process_figures(server):
    """Open descriptors (one per client, against the process's limit), memory, CPU."""
    async with api_client(server) as http, ws_client(server) as c:
        await c.ping_ok()
        fams = _families((await http.get("/metrics")).text)
    for name in ("process_open_fds", "process_max_fds", "process_resident_memory_bytes"):
        assert name in fams, list(fams)
    [open_fds] = fams["process_open_fds"].samples
    assert open_fds.value >= 2  # this client's socket and the API client's at least


def broker_settings(broker: str, request: pytest.FixtureRequest) -> dict[str, Any]:
    if broker == "memory":
        return {}
    return {
        "broker_url": request.getfixturevalue("redis_server").url,
        "broker_prefix": request.getfixturevalue("redis_prefix"),
    }


async def test_readyz_is_503_at_once_while_redis_does_not_answer(
    make_server: Any, own_redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A Redis that stops answering (paused, a partition): the probe is answered 503 in
    under a second, not after the 5 s command timeout (a probe's own timeout first: it
    saw no 503), and 200 again once Redis answers. Each change is logged once (the pod
    left its Service with nothing in its log to say why)."""
    server = await make_server(broker_url=own_redis_server.url)
    async with api_client(server) as http:
        assert (await http.get("/readyz")).status_code == 200
        own_redis_server.command("CLIENT", "PAUSE", "4000", "ALL")
        with caplog.at_level(logging.WARNING, logger="gateway.ops"):
            r = await http.get("/readyz", timeout=3)  # within 3 s: the command timeout is 5
            assert (r.status_code, r.json()) == (503, {"status": "broker not answering"})

            async def ready() -> bool:
                return (await http.get("/readyz", timeout=3)).status_code == 200

            await poll(ready, timeout=15)
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.ops"]
    assert lines == [
        "not ready: broker not answering (/readyz answers 503)",
        "ready again: the broker answers",
    ], lines


@pytest.mark.parametrize("broker", ["memory", "redis"])
async def test_a_history_limit_past_any_history_is_all_of_it_on_either_broker(
    broker: str, make_server: Any, request: pytest.FixtureRequest
) -> None:
    """A limit is any integer ≥ 0: one past what the broker keeps (or past what Redis's
    scripts take as a number) answers what history holds, never a broker error."""
    server = await make_server(**broker_settings(broker, request))
    async with api_client(server) as http, ws_client(server) as ws:
        results = [await api_publish(http, "big", n) for n in range(1, 4)]
        whole = {
            "publications": [{"offset": n, "data": n} for n in (1, 2, 3)],
            "offset": 3,
            "epoch": results[0]["epoch"],
        }
        for limit in [3, 101, 2**53 + 1, 10**17, 2**63 - 1]:
            assert await api_history(http, "big", limit=limit) == whole, limit
            await ws.send({"id": 1, "op": "history", "channel": "big", "limit": limit})
            assert await ws.recv() == {"id": 1, "ok": True, "result": whole}, limit


@pytest.mark.parametrize("broker", ["memory", "redis"])
async def test_a_publish_retried_with_its_idempotency_key_is_published_once(
    broker: str, make_server: Any, request: pytest.FixtureRequest
) -> None:
    """A backend that retries a publish (its first answer lost, a 503 after a slow Redis
    that published anyway) sends the same ``idempotency_key``: the retry is answered
    with the first one's offset and epoch and nothing is published again, for
    subscribers or history. Per channel: a broadcast with a key publishes to the
    channels that have not had it."""
    server = await make_server(**broker_settings(broker, request))
    async with api_client(server) as http, ws_client(server) as ws:
        await ws.subscribe("once")
        stats = server.gateway.hub.stats
        counted = stats.publications_in
        body = {"channel": "once", "data": {"n": 1}, "idempotency_key": "order-7"}
        first = await http.post("/api/publish", json=body, headers=bearer())
        assert first.status_code == 200, first.text
        for data in [{"n": 1}, {"n": "changed"}]:
            again = await http.post("/api/publish", json=body | {"data": data}, headers=bearer())
            assert again.status_code == 200 and again.json() == first.json(), again.text
        later = await api_publish(http, "once", {"n": 2})
        assert later["offset"] == first.json()["offset"] + 1
        assert stats.publications_in == counted + 2  # a repeat is not a publication
        pushes = await ws.publications("once", 2)
        assert [p["data"] for p in pushes] == [{"n": 1}, {"n": 2}]
        history = await api_history(http, "once")
        assert [p["data"] for p in history["publications"]] == [{"n": 1}, {"n": 2}]

        broadcast = {"channels": ["once", "b2"], "data": 3, "idempotency_key": "order-7"}
        r = await http.post("/api/broadcast", json=broadcast, headers=bearer())
        assert r.status_code == 200, r.text
        once, b2 = r.json()["results"]
        assert (once["channel"], once["offset"]) == ("once", first.json()["offset"])
        assert (b2["channel"], b2["offset"]) == ("b2", 1)
        r = await http.post("/api/broadcast", json=broadcast, headers=bearer())
        assert r.json()["results"] == [once, b2]
        assert len((await api_history(http, "b2"))["publications"]) == 1
        assert len((await api_history(http, "once"))["publications"]) == 2


@pytest.mark.parametrize("key", ["", "x" * 129, 7, ["k"], {"k": 1}, True])
async def test_an_idempotency_key_that_is_not_a_short_string_is_400(server, key):
    async with api_client(server) as http:
        for path, body in [
            ("/api/publish", {"channel": "k", "data": 1, "idempotency_key": key}),
            ("/api/broadcast", {"channels": ["k"], "data": 1, "idempotency_key": key}),
        ]:
            r = await http.post(path, json=body, headers=bearer())
            assert_error(r, 400, "bad_request")
            assert "idempotency_key" in r.json()["error"]["message"]
        assert (await api_history(http, "k"))["publications"] == []
        body = {"channel": "k", "data": 1, "idempotency_key": "x" * 128}
        assert (await http.post("/api/publish", json=body, headers=bearer())).status_code == 200


async def test_data_nested_deeper_than_json_is_written_back_is_400(server):
    """orjson reads 1,024 levels of nesting and writes 254: a 400 between the two (it was
    a text 500), on every way in, and nothing published."""
    deep = "[" * 300 + "]" * 300
    headers = {**bearer(), "content-type": "application/json"}
    async with api_client(server) as http:
        for path, body in [
            ("/api/publish", f'{{"channel": "deep", "data": {deep}}}'),
            ("/api/broadcast", f'{{"channels": ["deep"], "data": {deep}}}'),
            ("/api/publish/stream?channel=deep", f"1\n{deep}\n"),
        ]:
            r = await http.post(path, content=body, headers=headers)
            assert r.status_code == 400, (path, r.text)
            assert r.json()["error"]["code"] == "bad_request", r.text
            assert "nested too deeply" in r.json()["error"]["message"], r.text
        assert r.json()["published"] == 1 and "line 2" in r.json()["error"]["message"]
        assert [p["data"] for p in (await api_history(http, "deep"))["publications"]] == [1]


async def test_each_gateway_has_its_own_api_publish_rate(make_server):
    """Regression: the buckets were one process-wide dict, made with the first app's
    rate; a second app in the process (tests; an embedding) got the first one's."""
    body = {"channel": "own", "data": 1}
    generous = await make_server(api_publish_rate=1000)
    async with api_client(generous) as http:
        for _ in range(3):
            assert (await http.post("/api/publish", json=body, headers=bearer())).status_code == 200
    strict = await make_server(api_publish_rate=0.05)  # one, then one per 20 s
    async with api_client(strict) as http:
        codes = [
            (await http.post("/api/publish", json=body, headers=bearer())).status_code
            for _ in range(2)
        ]
        assert codes == [200, 429]


async def test_the_api_publish_rate_is_per_user_and_a_429_says_when_to_retry(make_server):
    """``api_publish_rate`` per token ``sub``: a burst of that many, then 429
    ``rate_limited`` with ``Retry-After`` in whole seconds; another user is not held back,
    and the first one publishes again once its bucket refilled."""
    server = await make_server(api_publish_rate=2)
    body = {"channel": "rl", "data": 1}
    async with api_client(server) as http:
        codes = [
            (await http.post("/api/publish", json=body, headers=bearer())).status_code
            for _ in range(3)
        ]
        assert codes == [200, 200, 429]
        r = await http.post("/api/publish", json=body, headers=bearer())
        assert_error(r, 429, "rate_limited")
        assert r.headers["retry-after"] == "1"
        other = bearer(token("other-backend"))
        assert (await http.post("/api/publish", json=body, headers=other)).status_code == 200

        async def published_again() -> bool:
            r = await http.post("/api/publish", json=body, headers=bearer())
            assert r.status_code in (200, 429), r.text
            return r.status_code == 200

        await poll(published_again, timeout=5, interval=0.1)


async def test_a_client_leaving_mid_body_is_no_server_error(
    server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A publish whose client left before its body was in: an ERROR with a traceback
    (starlette's ClientDisconnect) per such client, which anyone could use to fill the
    log; quietly answered now, and the worker goes on."""
    with caplog.at_level(logging.INFO):
        for _ in range(3):
            _, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(
                f"POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token()}\r\n"
                "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
                '{"channel": "news"'.encode()
            )
            await writer.drain()
            writer.close()
        # Each request's end (the server saw its client leave) closes its connection.
        await eventually(lambda: not server.server.server_state.connections)
        async with api_client(server) as http:
            assert (await http.get("/healthz")).status_code == 200
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
