"""Server-Sent Events over real HTTP: headers, framing, resume with the cursor, gaps,
heartbeats, errors before the stream, presence events, CORS."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import jwt
import pytest

from tests.conftest import eventually, token
from tests.helpers import (
    SseStream,
    api_client,
    api_publish,
    bearer,
    open_sse,
    parse_sse,
    sse_params,
    sse_request,
    ws_client,
)


def pub(channel: str, offset: int, epoch: str, data: Any) -> dict[str, Any]:
    return {"channel": channel, "offset": offset, "epoch": epoch, "data": data}


async def opening(stream: SseStream) -> dict[str, Any]:
    """The stream's first block: ``retry`` (and possibly the starting ``id``), no data."""
    first = await stream.next()
    assert "comment" not in first, first
    assert "retry" in first and first["retry"].isdigit(), first
    assert "data" not in first and "event" not in first, first
    return first


async def test_parse_sse_handles_comments_multiline_data_and_blocks_without_data():
    async def lines() -> AsyncIterator[str]:
        for line in [
            ": hello",
            "retry: 10",
            "id: c0",
            "",
            "id: c1",
            "data: a",
            "data: b",
            "",
            ":",
            "event: x",
            "data: {}",
            "",
        ]:
            yield line

    assert [e async for e in parse_sse(lines())] == [
        {"comment": "hello"},
        {"retry": "10", "id": "c0"},
        {"id": "c1", "data": "a\nb"},
        {"comment": ""},
        {"event": "x", "data": "{}"},
    ]


# --------------------------------------------------------------------------- stream basics


async def test_sse_response_has_event_stream_headers(server):
    async with api_client(server) as http, open_sse(http, ["prices"]) as s:
        h = s.response.headers
        assert s.response.status_code == 200
        assert h["content-type"] == "text/event-stream"  # exactly (the format is UTF-8 always)
        assert "no-cache" in [v.strip() for v in h["cache-control"].split(",")]
        assert h["x-accel-buffering"] == "no"
        assert "content-encoding" not in h  # no compression even when the client accepts gzip
        assert "content-length" not in h
        await opening(s)


async def test_sse_stream_opens_with_retry_field(make_server):
    server = await make_server(sse_retry_ms=1234)
    async with api_client(server) as http, open_sse(http, ["prices"]) as s:
        first = await opening(s)
        assert first["retry"] == "1234"


async def test_sse_sends_one_event_per_publication_with_id_and_exact_data(server):
    async with api_client(server) as http, open_sse(http, ["prices"]) as s:
        await opening(s)
        published = [await api_publish(http, "prices", {"bid": 1.01 + n}) for n in range(3)]
        events = await s.publications(3)
        epoch = published[0]["epoch"]
        assert [e["json"] for e in events] == [
            pub("prices", n + 1, epoch, {"bid": 1.01 + n}) for n in range(3)
        ]
        ids = [e["id"] for e in events]
        assert all(isinstance(i, str) and i for i in ids)
        assert len(set(ids)) == 3
        for e in events:
            assert set(e) == {"id", "data", "json"}, e  # no event: field, no retry:


async def test_sse_publication_data_is_compact_json_on_one_line(server):
    async with api_client(server) as http, open_sse(http, ["prices"]) as s:
        await opening(s)
        await api_publish(http, "prices", {"text": "line1\nline2", "u": "é"})
        [event] = await s.publications(1)
        assert "\n" not in event["data"]
        assert event["json"]["data"] == {"text": "line1\nline2", "u": "é"}


async def test_sse_delivers_ws_publications_to_several_streams(server):
    async with (
        api_client(server) as http,
        open_sse(http, ["room"]) as a,
        open_sse(http, ["room", "other"]) as b,
    ):
        await opening(a)
        await opening(b)
        async with ws_client(server) as c:
            r = await c.publish("room", "from ws")
        for s in (a, b):
            [e] = await s.publications(1)
            assert e["json"] == pub("room", 1, r["epoch"], "from ws")


async def test_sse_with_bearer_header_instead_of_token_parameter(server):
    async with (
        api_client(server) as http,
        open_sse(http, ["prices"], query_token=False, headers=bearer(token("hdr"))) as s,
    ):
        await opening(s)
        r = await api_publish(http, "prices", 1)
        [e] = await s.publications(1)
        assert e["json"] == pub("prices", 1, r["epoch"], 1)


# --------------------------------------------------------------------------- resume


@pytest.mark.parametrize("how", ["header", "query"])
async def test_sse_resume_single_channel_with_last_event_id_loses_and_repeats_nothing(server, how):
    async with api_client(server) as http:
        async with open_sse(http, ["prices"]) as s:
            await opening(s)
            for n in range(1, 4):
                await api_publish(http, "prices", n)
            got = await s.publications(3)
            epoch = got[0]["json"]["epoch"]
            last = s.last_id
            assert last == got[-1]["id"]
        for n in range(4, 7):  # while disconnected
            await api_publish(http, "prices", n)
        kw: dict[str, Any] = (
            {"headers": {"Last-Event-ID": last}} if how == "header" else {"last_event_id": last}
        )
        async with open_sse(http, ["prices"], **kw) as s:
            await opening(s)
            missed = await s.publications(3)
            assert [e["json"] for e in missed] == [pub("prices", n, epoch, n) for n in range(4, 7)]
            await api_publish(http, "prices", 7)
            [live] = await s.publications(1)
            assert live["json"] == pub("prices", 7, epoch, 7)


async def test_sse_cursor_of_the_opening_block_resumes_before_any_publication(server):
    async with api_client(server) as http:
        async with open_sse(http, ["quiet"]) as s:
            first = await opening(s)
            assert first.get("id"), "the opening block carries the starting cursor"
            last = s.last_id
            assert last is not None
        results = [await api_publish(http, "quiet", n) for n in range(1, 4)]
        async with open_sse(http, ["quiet"], headers={"Last-Event-ID": last}) as s:
            await opening(s)
            got = await s.publications(3)
            assert [e["json"] for e in got] == [
                pub("quiet", n, results[0]["epoch"], n) for n in range(1, 4)
            ]


async def test_sse_resume_multi_channel_each_channel_in_order_nothing_lost_or_repeated(server):
    channels = ["m:a", "m:b", "m:c", "m:d"]
    async with api_client(server) as http:
        epochs: dict[str, str] = {}
        async with open_sse(http, channels) as s:
            await opening(s)
            # Some publications in a, b, c before the drop; none in d.
            for ch, n in [("m:a", 2), ("m:b", 1), ("m:c", 3)]:
                for i in range(n):
                    r = await api_publish(http, ch, f"{ch}-{i + 1}")
                    epochs[ch] = r["epoch"]
            await s.publications(6)
            last = s.last_id
        # Interleaved while disconnected.
        expected: dict[str, list[int]] = {ch: [] for ch in channels}
        start = {"m:a": 2, "m:b": 1, "m:c": 3, "m:d": 0}
        for round_ in range(4):
            for ch in channels:
                r = await api_publish(http, ch, f"{ch}-{start[ch] + round_ + 1}")
                epochs[ch] = r["epoch"]
                expected[ch].append(r["offset"])
        async with open_sse(http, channels, last_event_id=last) as s:
            await opening(s)
            got = await s.publications(16)
            per_channel: dict[str, list[int]] = {ch: [] for ch in channels}
            for e in got:
                j = e["json"]
                assert j["epoch"] == epochs[j["channel"]]
                assert j["data"] == f"{j['channel']}-{j['offset']}"
                per_channel[j["channel"]].append(j["offset"])
            assert per_channel == expected
            assert expected == {
                "m:a": [3, 4, 5, 6],
                "m:b": [2, 3, 4, 5],
                "m:c": [4, 5, 6, 7],
                "m:d": [1, 2, 3, 4],
            }
            await api_publish(http, "m:d", "m:d-5")
            [live] = await s.publications(1)
            assert live["json"] == pub("m:d", 5, epochs["m:d"], "m:d-5")


async def test_sse_resume_twice_in_a_row_keeps_every_channel_position(server):
    channels = ["r:a", "r:b"]
    async with api_client(server) as http:
        async with open_sse(http, channels) as s:
            await opening(s)
            last = s.last_id
            assert last is not None
        await api_publish(http, "r:a", 1)
        async with open_sse(http, channels, headers={"Last-Event-ID": last}) as s:
            await opening(s)
            [e] = await s.publications(1)
            assert (e["json"]["channel"], e["json"]["offset"]) == ("r:a", 1)
            last = s.last_id
            assert last is not None
        await api_publish(http, "r:b", 1)
        await api_publish(http, "r:a", 2)
        async with open_sse(http, channels, headers={"Last-Event-ID": last}) as s:
            await opening(s)
            got = sorted(
                (e["json"]["channel"], e["json"]["offset"]) for e in await s.publications(2)
            )
            assert got == [("r:a", 2), ("r:b", 1)]


async def test_sse_gap_event_when_position_fell_out_of_history_then_live(make_server):
    server = await make_server(history_size=3)
    async with api_client(server) as http:
        async with open_sse(http, ["g"]) as s:
            await opening(s)
            await api_publish(http, "g", 1)
            await s.publications(1)
            last = s.last_id
            assert last is not None
        results = [await api_publish(http, "g", n) for n in range(2, 9)]  # 7 > history of 3
        epoch = results[0]["epoch"]
        async with open_sse(http, ["g"], headers={"Last-Event-ID": last}) as s:
            await opening(s)
            gap = await s.data_event()
            assert gap["event"] == "gap"
            assert gap["json"] == {"channel": "g"}
            assert gap.get("id"), "the gap event moves the cursor to the live position"
            await api_publish(http, "g", 9)
            [live] = await s.publications(1)
            assert live["json"] == pub("g", 9, epoch, 9)
            gap_cursor = s.last_id
            assert gap_cursor is not None
        # The cursor after the gap resumes from the live position, no second gap.
        await api_publish(http, "g", 10)
        async with open_sse(http, ["g"], headers={"Last-Event-ID": gap_cursor}) as s:
            await opening(s)
            [e] = await s.publications(1)
            assert e["json"] == pub("g", 10, epoch, 10)


async def test_sse_gap_for_one_channel_recovery_for_another(make_server):
    server = await make_server(history_size=3)
    async with api_client(server) as http:
        async with open_sse(http, ["ok", "lost"]) as s:
            await opening(s)
            await api_publish(http, "ok", 1)
            await api_publish(http, "lost", 1)
            await s.publications(2)
            last = s.last_id
        ok = [await api_publish(http, "ok", n) for n in (2, 3)]
        lost = [await api_publish(http, "lost", n) for n in range(2, 9)]
        async with open_sse(http, ["ok", "lost"], last_event_id=last) as s:
            await opening(s)
            got = [await s.data_event() for _ in range(3)]
            gaps = [e for e in got if e.get("event") == "gap"]
            pubs = [e["json"] for e in got if "event" not in e]
            assert [g["json"] for g in gaps] == [{"channel": "lost"}]
            assert pubs == [pub("ok", 2, ok[0]["epoch"], 2), pub("ok", 3, ok[0]["epoch"], 3)]
            await api_publish(http, "lost", 9)
            [live] = await s.publications(1)
            assert live["json"] == pub("lost", 9, lost[0]["epoch"], 9)


async def test_sse_cursor_with_unknown_epoch_gives_gap(server):
    async with api_client(server) as http:
        r = await api_publish(http, "e", 1)
        async with open_sse(http, ["e"]) as s:
            await opening(s)
            cursor = s.last_id
        assert cursor and r["epoch"] in cursor  # sanity for the substitution below
        forged = cursor.replace(r["epoch"], "someotherepoch")
        async with open_sse(http, ["e"], headers={"Last-Event-ID": forged}) as s:
            await opening(s)
            gap = await s.data_event()
            assert (gap.get("event"), gap["json"]) == ("gap", {"channel": "e"})
            await api_publish(http, "e", 2)
            [live] = await s.publications(1)
            assert live["json"] == pub("e", 2, r["epoch"], 2)


@pytest.mark.parametrize("cursor", ["garbage", "x~y", "a~b~c~d", "a~~1", "~e~1", "a b~e~1"])
async def test_sse_malformed_cursor_is_400_bad_request(server, cursor):
    async with api_client(server) as http:
        for params, headers in [
            (sse_params(["a"], token(), cursor), {}),
            (sse_params(["a"], token()), {"Last-Event-ID": cursor}),
        ]:
            status, _, body = await sse_request(http, params, headers)
            assert status == 400
            assert body == {"error": {"code": "bad_request", "message": body["error"]["message"]}}


# --------------------------------------------------------------------------- heartbeats


async def test_sse_sends_ping_comment_every_heartbeat_interval(make_server):
    server = await make_server(sse_heartbeat=0.2)
    async with api_client(server) as http, open_sse(http, ["quiet"]) as s:
        await opening(s)
        comments: list[str] = []
        while len(comments) < 3:
            item = await s.next(timeout=2)
            assert "comment" in item, item
            comments.append(item["comment"])
        assert comments == ["ping", "ping", "ping"]
        # Heartbeats do not disturb events.
        r = await api_publish(http, "quiet", "x")
        [e] = await s.publications(1, timeout=2)
        assert e["json"] == pub("quiet", 1, r["epoch"], "x")


@pytest.mark.parametrize("raw_writes", [True, False], ids=["detached", "asgi"])
async def test_sse_stream_ends_when_its_token_expires_and_resumes_with_a_new_one(
    make_server, raw_writes
):
    """A stream cannot refresh its token: it ends at ``exp`` + leeway (here 0), and the
    client reconnects with a fresh token and its cursor, losing nothing."""
    server = await make_server(jwt_leeway=0, raw_writes=raw_writes)
    async with api_client(server) as http:
        async with open_sse(http, ["exp"], token(ttl=1.5)) as s:
            await opening(s)
            r = await api_publish(http, "exp", "before")
            [e] = await s.publications(1)
            cursor = e["id"]
            rest = await s.until_end(timeout=5)
            assert [i for i in rest if "comment" not in i] == []
        await eventually(lambda: len(server.gateway.hub.sessions) == 0)
        after = await api_publish(http, "exp", "after")
        async with open_sse(http, ["exp"], token(), last_event_id=cursor) as s2:
            await opening(s2)
            [e2] = await s2.publications(1)
            assert e2["json"] == pub("exp", after["offset"], r["epoch"], "after")


async def test_sse_heartbeats_run_until_the_token_expires_and_the_stream_ends_then_not_before(
    make_server,
):
    """One timer per stream serves both: heartbeats every interval while the token is
    valid, then the end at ``exp`` (leeway 0) when it comes before the next heartbeat."""
    server = await make_server(jwt_leeway=0, sse_heartbeat=0.25)
    tok = token(ttl=2)
    exp = jwt.decode(tok, options={"verify_signature": False})["exp"]  # (whole seconds)
    async with api_client(server) as http, open_sse(http, ["beats"], tok) as s:
        await opening(s)
        opened = time.time()
        rest = await s.until_end(timeout=6)
        ended = time.time()
    assert [i.get("comment") for i in rest] == ["ping"] * len(rest), rest
    # Heartbeats all along (a late one or two allowed for a busy machine), not only
    # before a first expiry check.
    assert len(rest) >= max(2, int((exp - opened) / 0.25) - 2), (rest, exp - opened)
    assert ended >= exp, (ended, exp)  # not a heartbeat early
    await eventually(lambda: len(server.gateway.hub.sessions) == 0)


# --------------------------------------------------------------------------- errors


def _assert_error_body(status: int, headers: Any, body: Any, want_status: int, code: str) -> None:
    assert status == want_status, (status, body)
    assert headers["content-type"].split(";")[0] == "application/json"
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), body
    assert body == {"error": {"code": code, "message": body["error"]["message"]}}
    assert isinstance(body["error"]["message"], str)


@pytest.mark.parametrize(
    "tok",
    [None, "", "garbage", "OTHER", "EXPIRED"],
    ids=["missing", "empty", "garbage", "other_secret", "expired"],
)
async def test_sse_bad_or_missing_token_is_401_before_the_stream(server, tok):
    if tok == "OTHER":
        tok = token("eve", secret="another-secret-0123456789abcdef0123456789")
    elif tok == "EXPIRED":
        tok = token("eve", ttl=-60)
    async with api_client(server) as http:
        status, headers, body = await sse_request(http, sse_params(["prices"], tok))
        _assert_error_body(status, headers, body, 401, "unauthorized")


async def test_max_connections_counts_both_transports_and_frees_a_place_on_close(make_server):
    """At ``max_connections`` a stream is refused with 503 (code ``internal``) before it
    starts (and a WebSocket with 1013), WebSockets and streams counted together; a
    connection that closes gives its place back to either transport."""
    server = await make_server(max_connections=2)
    async with api_client(server) as http, open_sse(http, ["full"]) as first:
        await opening(first)
        async with ws_client(server) as ws:
            await ws.ping_ok()
            status, headers, body = await sse_request(http, sse_params(["full"], token()))
            _assert_error_body(status, headers, body, 503, "internal")
            async with ws_client(server) as refused:
                code, _, _ = await refused.expect_close()
            assert code == 1013
        await eventually(lambda: server.gateway.connections.total == 1)
        async with open_sse(http, ["full"]) as second:  # the WebSocket's place
            await opening(second)
            assert server.gateway.connections.open == {"websocket": 0, "sse": 2}
            status, _, _ = await sse_request(http, sse_params(["full"], token()))
            assert status == 503


async def test_sse_bad_bearer_header_is_401(server):
    async with api_client(server) as http:
        status, headers, body = await sse_request(
            http, sse_params(["prices"]), {"Authorization": "Bearer nope"}
        )
        _assert_error_body(status, headers, body, 401, "unauthorized")


async def test_sse_forbidden_channel_is_403(server):
    tok = token("u", subscribe=["chat:*"])
    async with api_client(server) as http:
        for channels in (["prices"], ["chat:ok", "prices"]):
            status, headers, body = await sse_request(http, sse_params(channels, tok))
            _assert_error_body(status, headers, body, 403, "forbidden")
        status, headers, body = await sse_request(http, sse_params(["x"], token("u", subscribe=[])))
        _assert_error_body(status, headers, body, 403, "forbidden")
    # Nothing was left subscribed by the refused requests.
    await eventually(lambda: len(server.gateway.hub.sessions) == 0)


@pytest.mark.parametrize("name", ["a b", "a/b", "", "é", "x" * 129, "abc\n"])
async def test_sse_invalid_channel_name_is_400(server, name):
    async with api_client(server) as http:
        status, headers, body = await sse_request(http, sse_params([name], token()))
        _assert_error_body(status, headers, body, 400, "bad_request")
        status, headers, body = await sse_request(http, sse_params(["ok", name], token()))
        _assert_error_body(status, headers, body, 400, "bad_request")


async def test_sse_without_channel_is_400(server):
    async with api_client(server) as http:
        status, headers, body = await sse_request(http, sse_params([], token()))
        _assert_error_body(status, headers, body, 400, "bad_request")


# --------------------------------------------------------------------------- presence


async def test_sse_on_presence_channel_gets_join_and_leave_events(server):
    async with api_client(server) as http, open_sse(http, ["chat:lobby"], token("watcher")) as s:
        await opening(s)
        async with ws_client(server, token("bob", info={"n": 1})) as bob:
            await bob.subscribe("chat:lobby")
            own = await bob.presence_push("chat:lobby", "join")
            client = own["client"]
            assert client["user"] == "bob"
            join = await _presence_event(s, "join", "bob")
            assert join["json"] == {"channel": "chat:lobby", "event": "join", "client": client}
            assert "id" not in join
        leave = await _presence_event(s, "leave", "bob")
        assert leave["json"] == {"channel": "chat:lobby", "event": "leave", "client": client}
        assert "id" not in leave


async def _presence_event(s: SseStream, event: str, user: str) -> dict[str, Any]:
    while True:
        e = await s.data_event()
        if e.get("event") == event and e["json"]["client"]["user"] == user:
            return e
        assert e.get("event") in ("join", "leave"), e


async def test_sse_client_appears_in_presence_and_leaves_when_stream_closes(server):
    async with api_client(server) as http, ws_client(server, token("watcher")) as w:
        await w.subscribe("chat:room")
        async with open_sse(http, ["chat:room"], token("sse-bob")) as s:
            await opening(s)
            join = await w.presence_push("chat:room", "join", user="sse-bob")
            r = await http.get("/api/channels/chat:room/presence", headers=bearer())
            assert join["client"] in r.json()["clients"]
        leave = await w.presence_push("chat:room", "leave", user="sse-bob")
        assert leave["client"] == join["client"]


async def test_sse_on_non_presence_channel_gets_no_join_or_leave(server):
    async with api_client(server) as http, open_sse(http, ["plain"]) as s:
        await opening(s)
        async with ws_client(server, token("bob")) as bob:
            await bob.subscribe("plain")
        r = await api_publish(http, "plain", "marker")
        e = await s.data_event()
        assert e == {
            "id": e["id"],
            "data": e["data"],
            "json": pub("plain", 1, r["epoch"], "marker"),
        }


# --------------------------------------------------------------------------- CORS


@pytest.mark.parametrize(
    ("path", "method", "req_headers"),
    [
        ("/sse", "GET", "last-event-id"),
        ("/api/publish", "POST", "authorization, content-type"),
        ("/api/broadcast", "POST", "authorization, content-type"),
    ],
)
async def test_cors_preflight_from_allowed_origin_is_answered(
    make_server, path, method, req_headers
):
    server = await make_server(allowed_origins="https://good.example")
    async with api_client(server) as http:
        r = await http.options(
            path,
            headers={
                "Origin": "https://good.example",
                "Access-Control-Request-Method": method,
                "Access-Control-Request-Headers": req_headers,
            },
        )
        assert r.status_code in (200, 204)
        assert r.headers["access-control-allow-origin"] == "https://good.example"
        allowed = r.headers.get("access-control-allow-methods", "").upper()
        assert method in allowed or "*" in allowed
        r = await http.options(
            path,
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": method},
        )
        assert r.headers.get("access-control-allow-origin") not in ("https://evil.example", "*")


async def test_cors_headers_on_sse_stream_and_api_response_for_allowed_origin(make_server):
    server = await make_server(allowed_origins="https://good.example")
    async with api_client(server) as http:
        async with open_sse(http, ["c"], headers={"Origin": "https://good.example"}) as s:
            assert s.response.headers["access-control-allow-origin"] == "https://good.example"
            await opening(s)
        r = await http.post(
            "/api/publish",
            json={"channel": "c", "data": 1},
            headers={**bearer(), "Origin": "https://good.example"},
        )
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "https://good.example"


async def test_sse_from_an_origin_not_allowed_is_refused_before_it_subscribes(make_server):
    """A page of another origin could not read the stream, but it would be subscribed
    and join presence all the same (with a cookie-authenticating connect hook, as its
    user): refused with 403 as a WebSocket is with 1008, before anything else, with no
    CORS header. Requests without ``Origin`` (not a browser) and allowed origins stream."""
    server = await make_server(allowed_origins="https://good.example")
    async with api_client(server) as http:
        for params in [sse_params(["chat:x"], token()), sse_params(["chat:x"], "bad-token")]:
            status, headers, body = await sse_request(
                http, params, headers={"Origin": "https://evil.example"}
            )
            _assert_error_body(status, headers, body, 403, "forbidden")
            assert body["error"]["message"] == "origin not allowed"
            assert "access-control-allow-origin" not in headers
        assert len(server.gateway.hub.sessions) == 0
        assert server.gateway.connections.open["sse"] == 0
        for sent in [{"Origin": "https://good.example"}, {}]:
            async with open_sse(http, ["chat:x"], headers=sent) as s:
                await opening(s)


async def test_sse_stream_is_flushed_per_publication_not_buffered(server):
    async with api_client(server) as http, open_sse(http, ["flush"]) as s:
        await opening(s)
        for n in range(1, 4):
            r = await api_publish(http, "flush", n)
            # Each event arrives on its own, before the next one is published.
            [e] = await s.publications(1)
            assert e["json"] == pub("flush", n, r["epoch"], n)


async def test_sse_disconnect_removes_the_session(server):
    """And the request's task ends: over ASGI (stock uvicorn) a stream whose client left
    while idle, on a channel that others here still read, kept its call waiting for good
    (its task, its memory: 990 of 1,000 such streams at the server's shutdown, which
    then waited for them), until its session's end released it."""
    state = server.server.server_state
    async with api_client(server) as http, ws_client(server) as stays:
        await stays.subscribe("gone")
        async with open_sse(http, ["gone"]) as s, open_sse(http, ["gone"]) as t:
            await opening(s)
            await opening(t)
            await eventually(lambda: len(server.gateway.hub.sessions) == 3)
        await eventually(lambda: len(server.gateway.hub.sessions) == 1)
        await eventually(lambda: len(state.tasks) <= 1)  # the WebSocket's, over ASGI
    await eventually(lambda: not state.connections)


async def test_sse_reconnecting_with_cursor_during_live_publishing_loses_and_repeats_nothing(
    make_server,
):
    server = await make_server(history_size=1000)
    channels, per_channel = ["live:a", "live:b"], 150
    async with api_client(server) as http:
        seen: dict[str, list[int]] = {ch: [] for ch in channels}
        async with open_sse(http, channels) as s:
            await opening(s)
            cursor = s.last_id
            assert cursor is not None

        async def publish() -> None:
            async with ws_client(server, token("pacer")) as pub:
                for i in range(per_channel):
                    for ch in channels:
                        await pub.publish(ch, i + 1)

        publisher = asyncio.create_task(publish())
        reconnects = 0
        try:
            while sum(map(len, seen.values())) < per_channel * len(channels):
                headers = {"Last-Event-ID": cursor} if reconnects % 2 else {}
                kw: dict[str, Any] = {} if reconnects % 2 else {"last_event_id": cursor}
                async with open_sse(http, channels, headers=headers, **kw) as s:
                    await opening(s)
                    remaining = per_channel * len(channels) - sum(map(len, seen.values()))
                    for e in await s.publications(min(remaining, 5 + reconnects % 17), timeout=10):
                        j = e["json"]
                        assert j["data"] == j["offset"]
                        seen[j["channel"]].append(j["offset"])
                    cursor = s.last_id
                    assert cursor is not None
                reconnects += 1
            await publisher
        finally:
            publisher.cancel()
        assert seen == {ch: list(range(1, per_channel + 1)) for ch in channels}
        assert reconnects > 5
