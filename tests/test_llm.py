"""LLM token streams end to end: the relay against a fake OpenAI-compatible upstream
(tests/fake_upstream.py, real uvicorn on a free port) and streamed NDJSON publish.

Every wait is bounded: subscribers read with deadlines, the upstream records its
client's disconnect in an ``asyncio.Event``, and "nothing more was published" is
proven by publishing a marker after the relay has finished and seeing it come next.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import RunningServer, eventually, free_port, token
from tests.fake_upstream import TOKENS, USAGE, FakeUpstream, serve_fake_upstream
from tests.helpers import (
    SseStream,
    WsClient,
    api_client,
    api_history,
    api_publish,
    bearer,
    open_sse,
    ws_client,
)
from tests.redis_server import RedisServer

UPSTREAM_TIMEOUT = 2.0  # "fake": the upstream timeout of the normal cases
STALL_TIMEOUT = 0.5  # "impatient": the same upstream with a short timeout, for stalls
CANCEL_BOUND = 10.0  # a deadline (shared machine) from a cancel to the upstream seeing it
LONG = [f" w{i}" for i in range(400)]  # an answer that would take far longer than any test
StartGateway = Callable[..., Awaitable[RunningServer]]


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    async with serve_fake_upstream() as fake:
        yield fake


@pytest.fixture
def start_gateway(upstream: FakeUpstream, make_server: Any) -> StartGateway:
    """``make_server`` with upstreams pointing at the fake one (and one at a closed port).

    Depends on ``upstream`` first, so the gateway stops before the upstream does.
    """

    async def start(extra_upstreams: dict[str, Any] | None = None, **settings: Any) -> Any:
        config = {
            "fake": {"url": upstream.url, "timeout": UPSTREAM_TIMEOUT},
            "impatient": {"url": upstream.url, "timeout": STALL_TIMEOUT},
            "closed": {"url": f"http://127.0.0.1:{free_port()}/v1", "timeout": UPSTREAM_TIMEOUT},
            **(extra_upstreams or {}),
        }
        return await make_server(llm_upstreams=orjson.dumps(config).decode(), **settings)

    return start


def new_channel() -> str:
    return "gen:" + secrets.token_hex(6)


def chat_request(**fake: Any) -> dict[str, Any]:
    return {"model": "ok", "messages": [{"role": "user", "content": "hi"}], **fake}


async def start_relay(
    http: httpx.AsyncClient,
    channel: str,
    upstream: str = "fake",
    tok: str | None = None,
    **fake: Any,
) -> str:
    body = {"channel": channel, "upstream": upstream, "request": chat_request(**fake)}
    r = await http.post("/api/streams", json=body, headers=bearer(tok))
    assert r.status_code == 202, (r.status_code, r.text)
    reply = r.json()
    assert reply == {"stream_id": reply["stream_id"], "channel": channel}
    assert isinstance(reply["stream_id"], str) and reply["stream_id"]
    return str(reply["stream_id"])


def is_final(data: Any) -> bool:
    return isinstance(data, dict) and data.get("type") in ("end", "error")


def joined(items: list[dict[str, Any]]) -> str:
    return "".join(i["data"]["text"] for i in items if i["data"].get("type") == "token")


async def ws_until_final(
    c: WsClient, channel: str, *, timeout: float = 5.0
) -> list[dict[str, Any]]:
    """Publication pushes of ``channel`` up to and including the first end/error."""
    deadline = time.monotonic() + timeout
    got: list[dict[str, Any]] = []
    while not got or not is_final(got[-1]["data"]):
        [push] = await c.publications(channel, 1, timeout=max(0.001, deadline - time.monotonic()))
        got.append(push)
    return got


async def sse_until_final(s: SseStream, *, timeout: float = 5.0) -> list[dict[str, Any]]:
    """Publications (decoded ``data:``) up to and including the first end/error."""
    deadline = time.monotonic() + timeout
    got: list[dict[str, Any]] = []
    while not got or not is_final(got[-1]["data"]):
        [event] = await s.publications(1, timeout=max(0.001, deadline - time.monotonic()))
        got.append(event["json"])
    return got


async def relays_done(server: RunningServer) -> None:
    await eventually(lambda: not server.app.state.relays.relays, timeout=5)


async def assert_nothing_after(
    http: httpx.AsyncClient, c: WsClient, channel: str, last_offset: int
) -> None:
    """No publication follows ``last_offset``: a marker published now arrives right after."""
    marker = await api_publish(http, channel, {"type": "marker"})
    assert marker["offset"] == last_offset + 1
    [push] = await c.publications(channel, 1)
    assert push["data"] == {"type": "marker"}


def assert_one_final_last(publications: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    """Exactly one end-or-error among ``publications``, it is ``kind`` and it is the last."""
    finals = [p for p in publications if is_final(p["data"])]
    assert len(finals) == 1, finals
    assert publications[-1] is finals[0], publications[-3:]
    assert finals[0]["data"]["type"] == kind, finals[0]
    return finals[0]


def assert_consecutive(offsets: list[int]) -> None:
    assert offsets == list(range(offsets[0], offsets[0] + len(offsets))), offsets


# --------------------------------------------------------------------------- relay: happy path


async def test_relay_streams_tokens_in_order_then_one_end_to_ws_subscribers(
    upstream: FakeUpstream, start_gateway: StartGateway
) -> None:
    server = await start_gateway()
    channel = new_channel()
    async with api_client(server) as http, ws_client(server) as c:
        await c.subscribe(channel)
        await start_relay(http, channel)
        got = await ws_until_final(c, channel)
        tokens, end = got[:-1], got[-1]
        assert [p["data"] for p in tokens] == [{"type": "token", "text": t} for t in TOKENS]
        assert joined(got) == "".join(upstream.last.sent) == "".join(TOKENS)
        assert end["data"] == {"type": "end", "finish_reason": "stop", "usage": USAGE}
        assert_consecutive([p["offset"] for p in got])
        await relays_done(server)
        await assert_nothing_after(http, c, channel, got[-1]["offset"])
    assert upstream.last.body["stream"] is True
    assert upstream.last.body["messages"] == [{"role": "user", "content": "hi"}]


async def test_relay_streams_tokens_in_order_then_one_end_to_sse_subscribers(
    upstream: FakeUpstream, start_gateway: StartGateway
) -> None:
    server = await start_gateway()
    channel = new_channel()
    async with api_client(server) as http, open_sse(http, [channel]) as s:
        await s.event()  # the opening block: the stream is subscribed
        await start_relay(http, channel)
        got = await sse_until_final(s)
        assert joined(got) == "".join(TOKENS)
        assert [p["data"]["type"] for p in got] == ["token"] * len(TOKENS) + ["end"]
        assert got[-1]["data"] == {"type": "end", "finish_reason": "stop", "usage": USAGE}
        assert_consecutive([p["offset"] for p in got])
        await relays_done(server)
        history = await api_history(http, channel)
        assert [p["data"] for p in history["publications"]] == [p["data"] for p in got]


# --------------------------------------------------------------------------- relay: resume


async def test_sse_subscriber_that_drops_mid_answer_resumes_with_last_event_id_exactly_once(
    upstream: FakeUpstream, start_gateway: StartGateway
) -> None:
    server = await start_gateway()
    channel = new_channel()
    words = [f" t{i}" for i in range(40)]
    async with api_client(server) as http:
        async with open_sse(http, [channel]) as s:
            await s.event()
            await start_relay(http, channel, fake_tokens=words, fake_delay=0.02)
            before = [e["json"] for e in await s.publications(5)]
            cursor = s.last_id
        assert cursor is not None
        # Tokens keep coming while nobody listens on this stream.
        await eventually(lambda: len(upstream.last.sent) >= 15)
        async with open_sse(http, [channel], headers={"Last-Event-ID": cursor}) as s2:
            after = await sse_until_final(s2)
    got = before + after
    assert joined(got) == "".join(words)
    assert_consecutive([p["offset"] for p in got])
    assert_one_final_last(got, "end")


async def test_ws_subscriber_that_drops_mid_answer_resumes_with_since_exactly_once(
    upstream: FakeUpstream, start_gateway: StartGateway
) -> None:
    server = await start_gateway()
    channel = new_channel()
    words = [f" t{i}" for i in range(40)]
    async with api_client(server) as http:
        async with ws_client(server) as c:
            await c.subscribe(channel)
            await start_relay(http, channel, fake_tokens=words, fake_delay=0.02)
            before = await c.publications(channel, 5)
        await eventually(lambda: len(upstream.last.sent) >= 15)
        since = {"offset": before[-1]["offset"], "epoch": before[-1]["epoch"]}
        async with ws_client(server) as c2:
            result = await c2.subscribe(channel, since=since)
            assert result["recovered"] is True
            after = await ws_until_final(c2, channel)
            got = before + after
            assert joined(got) == "".join(words)
            assert_consecutive([p["offset"] for p in got])
            assert_one_final_last(got, "end")
            await relays_done(server)
            await assert_nothing_after(http, c2, channel, got[-1]["offset"])


# --------------------------------------------------------------------------- relay: cancelling


async def test_delete_stream_closes_the_upstream_request_and_publishes_cancelled_last(
    upstream: FakeUpstream, start_gateway: StartGateway
) -> None:
    server = await start_gateway()
    channel = new_channel()
    async with api_client(server) as http, ws_client(server) as c:
        await c.subscribe(channel)
        stream_id = await start_relay(http, channel, fake_tokens=LONG, fake_delay=0.02)
        await c.publications(channel, 3)
        r = await http.delete(f"/api/streams/{stream_id}", headers=bearer())
        assert r.status_code == 200, r.text
        assert r.json() == {"stream_id": stream_id, "cancelled": True}
        asked = time.monotonic()
        call = upstream.last
        await asyncio.wait_for(call.disconnected.wait(), CANCEL_BOUND)
        assert call.disconnected_at is not None and call.disconnected_at - asked < CANCEL_BOUND
        assert not call.finished.is_set() and len(call.sent) < len(LONG)
        rest = await ws_until_final(c, channel)
        error = rest[-1]["data"]
        assert error["type"] == "error" and error["message"].startswith("cancelled"), error
        await relays_done(server)
        await assert_nothing_after(http, c, channel, rest[-1]["offset"])
        history = (await api_history(http, channel))["publications"]
        assert_one_final_last(history[:-1], "error")  # the marker aside
        r = await http.delete(f"/api/streams/{stream_id}", headers=bearer())
        assert r.status_code == 404  # gone once finished


class Absorbed:
    """A relay's task as ``cancel()`` sees it: a cancellation that goes nowhere."""

    def cancel(self) -> bool:
        return True


def absorb_cancels(relay: Any) -> Any:
    """Have every cancellation of ``relay``'s task absorbed; its real task."""
    task, relay.task = relay.task, Absorbed()
    return task


async def test_a_cancel_the_relays_task_never_sees_still_ends_it_at_the_next_chunk(
    upstream: FakeUpstream, start_gateway: StartGateway
) -> None:
    """Under load, a cancellation can land in the HTTP client's read where it is
    absorbed (CI saw a cancelled relay stream on to its natural end): the relay then
    stops at the upstream's next chunk, publishing none of that chunk's tokens, the same
    error a cancel publishes, and closes the upstream request."""
    server = await start_gateway()
    channel = new_channel()
    async with api_client(server) as http, ws_client(server) as c:
        await c.subscribe(channel)
        stream_id = await start_relay(http, channel, fake_tokens=LONG, fake_delay=0.02)
        await c.publications(channel, 3)
        relay = server.app.state.relays.relays[stream_id]
        task = absorb_cancels(relay)
        r = await http.delete(f"/api/streams/{stream_id}", headers=bearer())
        assert r.json() == {"stream_id": stream_id, "cancelled": True}
        call = upstream.last
        await asyncio.wait_for(call.disconnected.wait(), CANCEL_BOUND)
        assert not call.finished.is_set() and len(call.sent) < len(LONG)
        rest = await ws_until_final(c, channel)
        assert rest[-1]["data"] == {"type": "error", "message": "cancelled by request"}
        await asyncio.wait_for(task, CANCEL_BOUND)
        history = (await api_history(http, channel))["publications"]
        assert_one_final_last(history, "error")


async def test_a_cancel_the_task_never_sees_while_the_upstream_is_silent_ends_as_cancelled(
    upstream: FakeUpstream, start_gateway: StartGateway
) -> None:
    """The same absorbed cancellation while the upstream sends nothing more: the relay
    ends when the read gives up (the upstream's timeout), and the channel's end is
    the cancel's error, which the ``DELETE`` promised, not the stall's."""
    server = await start_gateway()
    channel = new_channel()
    async with api_client(server) as http, ws_client(server) as c:
        await c.subscribe(channel)
        stream_id = await start_relay(http, channel, "impatient", model="stall")
        await c.publications(channel, 1)
        relay = server.app.state.relays.relays[stream_id]
        absorb_cancels(relay)
        r = await http.delete(f"/api/streams/{stream_id}", headers=bearer())
        assert r.json() == {"stream_id": stream_id, "cancelled": True}
        rest = await ws_until_final(c, channel)
        assert rest[-1]["data"] == {"type": "error", "message": "cancelled by request"}


async def test_stream_nobody_subscribes_to_is_cancelled_after_idle_cancel_seconds(
    upstream: FakeUpstream, start_gateway: StartGateway
) -> None:
    server = await start_gateway(llm_idle_cancel=1)
    channel = new_channel()
    async with api_client(server) as http:
        started = time.monotonic()
        await start_relay(http, channel, fake_tokens=LONG, fake_delay=0.02)
        await eventually(lambda: upstream.calls)
        call = upstream.last
        await asyncio.wait_for(call.disconnected.wait(), 1 + CANCEL_BOUND)
        assert call.disconnected_at is not None
        assert 0.9 <= call.disconnected_at - started < 1 + CANCEL_BOUND
        assert not call.finished.is_set()
        await relays_done(server)
        history = (await api_history(http, channel))["publications"]
        final = assert_one_final_last(history, "error")
        assert final["data"]["message"].startswith("cancelled"), final
        assert "no subscribers" in final["data"]["message"]


async def test_stream_whose_subscriber_leaves_is_cancelled_after_idle_cancel_seconds(
    upstream: FakeUpstream, start_gateway: StartGateway
) -> None:
    server = await start_gateway(llm_idle_cancel=1)
    channel = new_channel()
    async with api_client(server) as http:
        async with ws_client(server) as c:
            await c.subscribe(channel)
            await start_relay(http, channel, fake_tokens=LONG, fake_delay=0.02)
            await c.publications(channel, 3)
        left = time.monotonic()
        call = upstream.last
        await asyncio.wait_for(call.disconnected.wait(), 1 + CANCEL_BOUND)
        assert call.disconnected_at is not None
        assert call.disconnected_at - left < 1 + CANCEL_BOUND
        assert not call.finished.is_set() and len(call.sent) < len(LONG)
        await relays_done(server)
        history = (await api_history(http, channel))["publications"]
        final = assert_one_final_last(history, "error")
        assert final["data"]["message"].startswith("cancelled"), final


async def test_stream_with_a_subscriber_is_not_idle_cancelled(
    upstream: FakeUpstream, start_gateway: StartGateway
) -> None:
    server = await start_gateway(llm_idle_cancel=0.3)
    channel = new_channel()
    words = [f" t{i}" for i in range(40)]  # 40 * 0.03 s: several idle periods long
    async with api_client(server) as http, ws_client(server) as c:
        await c.subscribe(channel)
        await start_relay(http, channel, fake_tokens=words, fake_delay=0.03)
        got = await ws_until_final(c, channel)
        assert got[-1]["data"]["type"] == "end", got[-1]
        assert joined(got) == "".join(words)


async def test_cancel_while_the_end_is_being_published_still_publishes_exactly_one_end(
    upstream: FakeUpstream, start_gateway: StartGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: a DELETE that arrived while the relay was publishing its ``end``
    cancelled that publish, so the answer ended with no final publication at all."""
    server = await start_gateway()
    relays = server.app.state.relays
    publishing_final, release = asyncio.Event(), asyncio.Event()
    publish = relays._publish

    async def held_final(channel: str, value: dict[str, Any]) -> None:
        if is_final(value):
            publishing_final.set()
            await release.wait()
        await publish(channel, value)

    monkeypatch.setattr(relays, "_publish", held_final)
    channel = new_channel()
    async with api_client(server) as http, ws_client(server) as c:
        await c.subscribe(channel)
        stream_id = await start_relay(http, channel)
        await asyncio.wait_for(publishing_final.wait(), 5)
        r = await http.delete(f"/api/streams/{stream_id}", headers=bearer())
        assert r.status_code == 200, r.text
        assert r.json() == {"stream_id": stream_id, "cancelled": False}  # too late to cancel
        release.set()
        got = await ws_until_final(c, channel)
        assert got[-1]["data"]["type"] == "end", got[-1]
        await relays_done(server)
        await assert_nothing_after(http, c, channel, got[-1]["offset"])


# --------------------------------------------------------------------------- relay: faults


FAULTS = [
    pytest.param("closed", "ok", ["unreachable (ConnectError)"], [], id="connect-refused"),
    pytest.param("fake", "http-500", ["HTTP 500"], ["overloaded"], id="http-500"),
    pytest.param("fake", "http-401", ["HTTP 401"], ["Incorrect"], id="http-401"),
    pytest.param("fake", "http-400", ["HTTP 400: This model's maximum context"], [], id="http-400"),
    pytest.param("fake", "http-503-endless", ["HTTP 503"], ["overloaded"], id="http-503-endless"),
    pytest.param("fake", "stream-error", ["error: content filtered"], ["code"], id="stream-error"),
    pytest.param("impatient", "stall", ["stalled", "0.5 s"], [], id="stall"),
    pytest.param("fake", "no-done", ["without [DONE]"], [], id="no-done"),
    pytest.param("fake", "bad-json", ["invalid JSON"], [], id="bad-json"),
    pytest.param("fake", "drop", ["connection failed (RemoteProtocolError)"], [], id="dropped"),
    pytest.param("fake", "endless-line", ["a line over 1048576 characters"], [], id="endless-line"),
]


@pytest.mark.parametrize(("name", "scenario", "words", "absent"), FAULTS)
async def test_upstream_fault_publishes_exactly_one_error_with_a_useful_message(
    upstream: FakeUpstream,
    start_gateway: StartGateway,
    caplog: pytest.LogCaptureFixture,
    name: str,
    scenario: str,
    words: list[str],
    absent: list[str],
) -> None:
    """The message says what failed; what the upstream said about itself (a 5xx's
    text, a 401's account, its error body's other fields) is logged, not published."""
    server = await start_gateway()
    channel = new_channel()
    async with api_client(server) as http, ws_client(server) as c:
        await c.subscribe(channel)
        with caplog.at_level(logging.WARNING, logger="gateway.llm.relay"):
            await start_relay(http, channel, name, model=scenario)
            got = await ws_until_final(c, channel, timeout=STALL_TIMEOUT + 4)
        error = got[-1]["data"]
        assert error["type"] == "error", got
        for word in words:
            assert word in error["message"], error
        for word in absent:
            assert word not in error["message"], error
            assert word in caplog.text, caplog.text  # for the operator
        await relays_done(server)
        await assert_nothing_after(http, c, channel, got[-1]["offset"])
        history = (await api_history(http, channel))["publications"][:-1]
        assert not [p for p in history if p["data"]["type"] == "end"]
        assert_one_final_last(history, "error")
    if scenario in ("stall", "bad-json", "endless-line", "stream-error"):  # kept open: closed
        await asyncio.wait_for(upstream.last.disconnected.wait(), CANCEL_BOUND)


@pytest.mark.parametrize("scenario", ["http-401", "http-400", "http-400-far"])
async def test_an_upstream_error_never_publishes_the_key_it_was_sent(
    upstream: FakeUpstream,
    start_gateway: StartGateway,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    scenario: str,
) -> None:
    """An upstream that echoes the API key in its error (as OpenAI's 401 does, in part):
    neither the published error nor the log line carries it, nor its head (the message
    was cut to 300 characters before the key was taken out: 35 of its 41 were shown)."""
    key = "sk-test-" + secrets.token_hex(12)
    monkeypatch.setenv("FAKE_LLM_KEY", key)
    server = await start_gateway(
        {"keyed": {"url": upstream.url, "api_key_env": "FAKE_LLM_KEY", "timeout": 2}}
    )
    async with api_client(server) as http, ws_client(server) as c:
        channel = new_channel()
        await c.subscribe(channel)
        with caplog.at_level(logging.DEBUG):
            await start_relay(http, channel, "keyed", model=scenario)
            [*_, final] = await ws_until_final(c, channel)
        assert upstream.last.headers["authorization"] == f"Bearer {key}"
        assert final["data"]["type"] == "error", final
        assert f"HTTP {scenario[5:8]}" in final["data"]["message"], final
        head = key[:12]  # "sk-test-" and 4 of its own
        assert head not in final["data"]["message"], final
        assert "[redacted]" in caplog.text, caplog.text  # the body was logged, without it
        assert head not in caplog.text
        if scenario != "http-401":  # about the request: its message is shown, key cut
            assert final["data"]["message"].endswith("(key [redacted])"), final


async def test_relays_at_once_are_not_held_to_an_http_clients_pool(
    upstream: FakeUpstream, start_gateway: StartGateway
) -> None:
    """Each relay holds its upstream request for the whole answer. The relays' client
    kept httpx's default pool of 100 connections: from the 101st relay on, a relay
    waited for another to end, then failed as if the upstream had stalled."""
    # (no relay cancelled for want of subscribers meanwhile, which let the 101st start)
    patient = {"patient": {"url": upstream.url, "timeout": 30}}
    server = await start_gateway(patient, llm_idle_cancel=60)
    async with api_client(server) as http:
        channels = [new_channel() for _ in range(110)]
        await asyncio.gather(*(start_relay(http, ch, "patient", model="stall") for ch in channels))
        assert await eventually(lambda: len(upstream.calls) == len(channels), timeout=10)


async def test_relay_skips_json_lines_that_are_not_chunks(
    upstream: FakeUpstream, start_gateway: StartGateway
) -> None:
    """Regression: ``{"choices": 7}`` (valid JSON, not a chunk) crashed the relay with a
    TypeError, so the channel never got an end or an error."""
    server = await start_gateway()
    channel = new_channel()
    async with api_client(server) as http, ws_client(server) as c:
        await c.subscribe(channel)
        await start_relay(http, channel, model="odd-shapes")
        got = await ws_until_final(c, channel)
        assert joined(got) == "".join(TOKENS)
        assert got[-1]["data"] == {"type": "end", "finish_reason": "stop", "usage": USAGE}


async def test_a_token_over_the_message_size_is_published_in_pieces_that_fit(
    upstream: FakeUpstream, start_gateway: StartGateway
) -> None:
    """Each publication of a relay stays within ``GATEWAY_MAX_MESSAGE_BYTES`` (as one from
    a backend must): a longer token's text is cut, between characters, into as many token
    publications as it takes, in order, and nothing of it is lost. Escapes count (a
    control character is six bytes of JSON), and so do characters past the BMP."""
    limit = 256
    server = await start_gateway(max_message_bytes=limit)
    parts = ["Hi", 'long text é\x01\n🙂"q" ', "!", "x"]
    envelope = len(orjson.dumps({"type": "token", "text": ""}))
    times = [1, 60, 1, limit - envelope]  # the last one fits exactly
    tokens = [text * count for text, count in zip(parts, times, strict=True)]
    channel = new_channel()
    async with api_client(server) as http, ws_client(server) as c:
        await c.subscribe(channel)
        await start_relay(http, channel, fake_tokens=parts, fake_times=times)
        got = await ws_until_final(c, channel)
        assert got[-1]["data"]["type"] == "end", got[-1]
        texts = [p["data"]["text"] for p in got[:-1]]
        assert "".join(texts) == "".join(tokens)
        assert texts[0] == "Hi" and texts[-2:] == ["!", tokens[-1]], texts
        assert len(texts) > 4  # the big one was cut
        sizes = [len(orjson.dumps(p["data"])) for p in got[:-1]]
        assert max(sizes) <= limit, sizes
        assert sizes[-1] == limit
        assert_consecutive([p["offset"] for p in got])
        history = (await api_history(http, channel))["publications"]
        assert [p["data"] for p in history] == [p["data"] for p in got]


async def test_starting_a_relay_counts_against_the_api_publish_rate(
    upstream: FakeUpstream, start_gateway: StartGateway
) -> None:
    """A relay publishes through the API (and costs the upstream's tokens): its start is
    under ``GATEWAY_API_PUBLISH_RATE`` per token ``sub`` as a publish is, 429 with
    ``Retry-After``, and no upstream call for the refused one."""
    server = await start_gateway(api_publish_rate=0.05)  # one, then one per 20 s
    body = {"channel": new_channel(), "upstream": "fake", "request": chat_request()}
    async with api_client(server) as http:
        first = await http.post("/api/streams", json=body, headers=bearer())
        assert first.status_code == 202, first.text
        r = await http.post("/api/streams", json=body, headers=bearer())
        assert r.status_code == 429, r.text
        assert r.json()["error"]["code"] == "rate_limited"
        assert 1 <= int(r.headers["retry-after"]) <= 20
        other = await http.post("/api/streams", json=body, headers=bearer(token("other-app")))
        assert other.status_code == 202, other.text
        await relays_done(server)
    assert len(upstream.calls) == 2


async def test_relay_that_fails_unexpectedly_still_publishes_one_error(
    upstream: FakeUpstream, start_gateway: StartGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever goes wrong inside the relay, subscribers are not left waiting forever."""
    server = await start_gateway()
    relays = server.app.state.relays

    async def broken(relay: Any, request: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("a bug")

    monkeypatch.setattr(relays, "_stream", broken)
    channel = new_channel()
    async with api_client(server) as http, ws_client(server) as c:
        await c.subscribe(channel)
        await start_relay(http, channel)
        [error] = await ws_until_final(c, channel)
        assert error["data"]["type"] == "error"
        assert "internal" in error["data"]["message"], error
        await relays_done(server)


# --------------------------------------------------------------------------- relay: API


async def test_start_stream_with_an_unknown_upstream_is_400(
    upstream: FakeUpstream, start_gateway: StartGateway
) -> None:
    server = await start_gateway()
    async with api_client(server) as http:
        for name in ["nope", upstream.url, 42]:
            body = {"channel": new_channel(), "upstream": name, "request": chat_request()}
            r = await http.post("/api/streams", json=body, headers=bearer())
            assert r.status_code == 400, (name, r.text)
            assert r.json()["error"]["code"] == "bad_request"
            assert "unknown upstream" in r.json()["error"]["message"]
    assert upstream.calls == []


async def test_start_stream_with_a_request_json_cannot_carry_on_is_400(
    upstream: FakeUpstream, start_gateway: StartGateway
) -> None:
    """A ``request`` nested deeper than JSON is written back (orjson reads 1,024 levels,
    writes 254) was accepted 202, then its relay failed with an internal error and an
    ERROR with a traceback, where a publish of the same is a 400 up front."""
    server = await start_gateway()
    deep = "[" * 300 + "]" * 300
    async with api_client(server) as http:
        request = f'{{"messages": {deep}}}'
        content = f'{{"channel": "{new_channel()}", "upstream": "fake", "request": {request}}}'
        r = await http.post("/api/streams", content=content, headers=bearer())
        assert r.status_code == 400, r.text
        assert r.json()["error"] == {
            "code": "bad_request",
            "message": "'request' is nested too deeply",
        }
    assert upstream.calls == []


async def test_a_relays_request_is_held_to_its_own_limit_not_a_publications(
    upstream: FakeUpstream, start_gateway: StartGateway
) -> None:
    """The chat request (a whole conversation) was held to GATEWAY_MAX_MESSAGE_BYTES,
    a publication's limit (64 KiB by default): a long prompt got 413. Its own limit is
    GATEWAY_LLM_MAX_REQUEST_BYTES."""
    server = await start_gateway(max_message_bytes=1024, llm_max_request_bytes=20_000)
    prompt = [{"role": "user", "content": "x" * 10_000}]
    async with api_client(server) as http:
        await start_relay(http, new_channel(), messages=prompt)  # 202
        assert await eventually(lambda: len(upstream.calls) == 1)
        assert upstream.last.body["messages"] == prompt
        long = chat_request(messages=[{"role": "user", "content": "x" * 30_000}])
        body = {"channel": new_channel(), "upstream": "fake", "request": long}
        r = await http.post("/api/streams", json=body, headers=bearer())
        assert r.status_code == 413, r.text
        assert r.json()["error"] == {"code": "too_large", "message": "body over 20000 bytes"}


async def test_start_stream_ignores_a_url_in_the_request_body(
    upstream: FakeUpstream, start_gateway: StartGateway
) -> None:
    server = await start_gateway()
    channel = new_channel()
    elsewhere = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    body = {
        "channel": channel,
        "upstream": "fake",
        "url": elsewhere,
        "base_url": elsewhere,
        "request": chat_request(),
    }
    async with api_client(server) as http, ws_client(server) as c:
        await c.subscribe(channel)
        r = await http.post("/api/streams", json=body, headers=bearer())
        assert r.status_code == 202, r.text
        got = await ws_until_final(c, channel)
        assert got[-1]["data"]["type"] == "end", got[-1]
    assert len(upstream.calls) == 1  # the configured upstream got the call


async def test_start_stream_without_publish_permission_is_403(
    upstream: FakeUpstream, start_gateway: StartGateway
) -> None:
    server = await start_gateway()
    channel = new_channel()
    body = {"channel": channel, "upstream": "fake", "request": chat_request()}
    reader = token("reader", subscribe=["*"], publish=["other:*"])
    async with api_client(server) as http:
        r = await http.post("/api/streams", json=body, headers=bearer(reader))
        assert r.status_code == 403, r.text
        assert r.json()["error"]["code"] == "forbidden"
        r = await http.post("/api/streams", json=body, headers=bearer("not-a-jwt"))
        assert r.status_code == 401, r.text
        assert (await api_history(http, channel))["publications"] == []
    assert upstream.calls == []


async def test_delete_stream_needs_publish_permission_on_its_channel(
    upstream: FakeUpstream, start_gateway: StartGateway
) -> None:
    server = await start_gateway()
    channel = new_channel()
    async with api_client(server) as http, ws_client(server) as c:
        await c.subscribe(channel)
        stream_id = await start_relay(http, channel, fake_tokens=LONG, fake_delay=0.02)
        reader = token("reader", subscribe=["*"], publish=["other:*"])
        r = await http.delete(f"/api/streams/{stream_id}", headers=bearer(reader))
        assert r.status_code == 403, r.text
        r = await http.delete("/api/streams/s-unknown", headers=bearer())
        assert r.status_code == 404, r.text
        assert not upstream.last.disconnected.is_set()
        r = await http.delete(f"/api/streams/{stream_id}", headers=bearer())
        assert r.status_code == 200, r.text
        await asyncio.wait_for(upstream.last.disconnected.wait(), CANCEL_BOUND)


async def test_delete_reaching_another_worker_cancels_the_relay_where_it_runs(
    upstream: FakeUpstream,
    start_gateway: StartGateway,
    redis_server: RedisServer,
    redis_prefix: str,
) -> None:
    """Behind a load balancer the DELETE lands on any worker: two workers on one Redis."""
    shared = {"broker_url": redis_server.url, "broker_prefix": redis_prefix}
    owner, other = await start_gateway(**shared), await start_gateway(**shared)
    channel = new_channel()
    async with (
        api_client(owner) as on_owner,
        api_client(other) as on_other,
        ws_client(other) as c,
    ):
        await c.subscribe(channel)
        stream_id = await start_relay(on_owner, channel, fake_tokens=LONG, fake_delay=0.02)
        await c.publications(channel, 3)
        assert stream_id not in other.app.state.relays.relays
        reader = token("reader", subscribe=["*"], publish=["other:*"])
        r = await on_other.delete(f"/api/streams/{stream_id}", headers=bearer(reader))
        assert r.status_code == 403, r.text
        for unknown in ("s-0123456789abcdef", "not-a-stream", "s-{x}"):
            r = await on_other.delete(f"/api/streams/{unknown}", headers=bearer())
            assert r.status_code == 404, (unknown, r.text)
            assert r.json()["error"]["code"] == "not_found"
        assert not upstream.last.disconnected.is_set()

        r = await on_other.delete(f"/api/streams/{stream_id}", headers=bearer())
        assert r.status_code == 200, r.text
        assert r.json() == {"stream_id": stream_id, "cancelled": True}
        await asyncio.wait_for(upstream.last.disconnected.wait(), CANCEL_BOUND)
        rest = await ws_until_final(c, channel)
        assert rest[-1]["data"] == {"type": "error", "message": "cancelled by request"}
        await relays_done(owner)
        # Finished: no worker knows the stream any more.
        for http in (on_owner, on_other):
            r = await http.delete(f"/api/streams/{stream_id}", headers=bearer())
            assert r.status_code == 404, r.text


async def test_relay_sends_the_configured_api_key_as_bearer(
    upstream: FakeUpstream, start_gateway: StartGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_LLM_KEY", "sk-test-0123456789")
    server = await start_gateway(
        {"keyed": {"url": upstream.url, "api_key_env": "FAKE_LLM_KEY", "timeout": 2}}
    )
    async with api_client(server) as http, ws_client(server) as c:
        channel = new_channel()
        await c.subscribe(channel)
        await start_relay(http, channel, "keyed")
        await ws_until_final(c, channel)
        assert upstream.last.headers["authorization"] == "Bearer sk-test-0123456789"
        channel = new_channel()
        await c.subscribe(channel)
        await start_relay(http, channel, "fake")
        await ws_until_final(c, channel)
        assert "authorization" not in upstream.last.headers  # no key configured there


# --------------------------------------------------------------------------- streamed publish


def ndjson(values: list[Any]) -> bytes:
    return b"".join(orjson.dumps(v) + b"\n" for v in values)


def split_oddly(body: bytes, sizes: list[int]) -> list[bytes]:
    """``body`` cut into chunks of the given sizes, cycling (lines split mid-way)."""
    chunks, i, k = [], 0, 0
    while i < len(body):
        chunks.append(body[i : i + sizes[k % len(sizes)]])
        i += sizes[k % len(sizes)]
        k += 1
    return chunks


async def gen(chunks: list[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


async def publish_stream(
    http: httpx.AsyncClient, channel: str, content: Any, tok: str | None = None
) -> httpx.Response:
    return await http.post(
        "/api/publish/stream",
        params={"channel": channel},
        content=content,
        headers={**bearer(tok), "content-type": "application/x-ndjson"},
    )


async def test_streamed_publish_of_10000_chunked_ndjson_lines_arrives_complete_and_in_order(
    make_server: Any,
) -> None:
    server = await make_server(client_queue_bytes=64 * 1024 * 1024)
    channel = new_channel()
    values = [{"i": i, "text": f"tok{i}"} for i in range(10_000)]
    chunks = split_oddly(ndjson(values), [1, 7, 3, 4093, 13, 64, 999, 2, 31, 8192])
    async with api_client(server) as http, ws_client(server) as c:
        await c.subscribe(channel)
        r = await publish_stream(http, channel, gen(chunks))
        assert r.status_code == 200, r.text
        reply = r.json()
        assert reply == {"published": 10_000, "offset": 10_000, "epoch": reply["epoch"]}
        got = await c.publications(channel, 10_000, timeout=20)
        assert [p["data"] for p in got] == values
        assert [p["offset"] for p in got] == list(range(1, 10_001))
        assert {p["epoch"] for p in got} == {reply["epoch"]}


async def test_streamed_publish_delivers_each_line_while_the_body_is_still_open(
    server: RunningServer,
) -> None:
    channel = new_channel()
    release = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield b'{"type": "token", "text": "a"}\n{"type": "tok'
        yield b'en", "text": "b"}\n{"type": "token", "text": "c"}\n'
        await release.wait()  # the request stays open until the test has seen a, b, c
        yield b'{"type": "token", "text": "d"}\n{"type": "end"}'  # last line: no newline

    async with api_client(server) as http, open_sse(http, [channel]) as s:
        await s.event()
        request = asyncio.create_task(publish_stream(http, channel, body()))
        try:
            early = await s.publications(3)
            assert [e["json"]["data"]["text"] for e in early] == ["a", "b", "c"]
            assert not request.done()
        finally:
            release.set()
        r = await request
        assert r.status_code == 200, r.text
        assert r.json() == {"published": 5, "offset": 5, "epoch": early[0]["json"]["epoch"]}
        late = await s.publications(2)
        assert [e["json"]["data"] for e in late] == [
            {"type": "token", "text": "d"},
            {"type": "end"},
        ]


async def test_streamed_publish_reports_a_malformed_line_by_number_and_keeps_earlier_lines(
    server: RunningServer,
) -> None:
    channel = new_channel()
    lines = [b'{"n": 1}', b'{"n": 2}', b"", b'{"n": 4}', b'{"n": 5', b'{"n": 6}']
    body = b"\n".join(lines) + b"\n"
    async with api_client(server) as http:
        r = await publish_stream(http, channel, gen(split_oddly(body, [5, 3])))
        assert r.status_code == 400, r.text
        reply = r.json()
        assert reply["error"]["code"] == "bad_request"
        assert "line 5" in reply["error"]["message"], reply
        assert reply["published"] == 3 and reply["offset"] == 3, reply
        history = await api_history(http, channel)
        assert [p["data"] for p in history["publications"]] == [{"n": 1}, {"n": 2}, {"n": 4}]
        assert history["epoch"] == reply["epoch"]
    # Answered: no longer a body the drain would stop (its reader closed with it).
    assert not server.gateway.body_readers


@pytest.mark.parametrize("chunk_size", [10_000, 50], ids=["line-in-one-chunk", "line-split"])
async def test_streamed_publish_line_over_max_message_bytes_is_413_naming_the_line(
    make_server: Any, chunk_size: int
) -> None:
    server = await make_server(max_message_bytes=256)
    channel = new_channel()
    body = ndjson([{"n": 1}, {"n": 2}, {"text": "x" * 1000}, {"n": 4}])
    async with api_client(server) as http:
        r = await publish_stream(http, channel, gen(split_oddly(body, [chunk_size])))
        assert r.status_code == 413, r.text
        reply = r.json()
        assert reply["error"]["code"] == "too_large"
        assert "line 3" in reply["error"]["message"], reply
        assert reply["published"] == 2, reply
        history = await api_history(http, channel)
        assert [p["data"] for p in history["publications"]] == [{"n": 1}, {"n": 2}]


@pytest.mark.parametrize("chunk_size", [10_000, 7], ids=["line-in-one-chunk", "line-split"])
async def test_a_line_of_the_size_limit_is_published_whatever_its_line_ending(
    make_server: Any, chunk_size: int
) -> None:
    """The limit is the line's data: a CRLF line's CR does not count; a byte more does."""
    server = await make_server(max_message_bytes=100)
    channel = new_channel()
    exact = b'"' + b"x" * 98 + b'"'  # 100 bytes of JSON
    async with api_client(server) as http:
        body = exact + b"\r\n" + exact + b"\n" + exact
        r = await publish_stream(http, channel, gen(split_oddly(body, [chunk_size])))
        assert r.status_code == 200, r.text
        assert r.json()["published"] == 3
        over = b'"' + b"x" * 99 + b'"'
        r = await publish_stream(http, channel, gen(split_oddly(over + b"\r\n", [chunk_size])))
        assert r.status_code == 413, r.text
        assert "line 1" in r.json()["error"]["message"]


async def test_a_line_the_limit_holds_only_as_sent_is_413(make_server: Any) -> None:
    """The limit is the data as published, JSON written again: a line of ``1e5`` within
    the limit as sent was published at more than twice it (``100000.0``)."""
    server = await make_server(max_message_bytes=100)
    channel = new_channel()
    line = b"[" + b",".join([b"1e5"] * 20) + b"]"  # 80 bytes; 181 once written again
    async with api_client(server) as http:
        r = await publish_stream(http, channel, gen([b'{"n": 1}\n' + line + b"\n"]))
        assert r.status_code == 413, r.text
        assert r.json()["error"]["message"] == "line 2: over 100 bytes"
        assert r.json()["published"] == 1
        history = await api_history(http, channel)
        assert [p["data"] for p in history["publications"]] == [{"n": 1}]


async def test_a_relays_end_is_within_the_size_limit_whatever_the_upstream_said(
    upstream: FakeUpstream, start_gateway: StartGateway
) -> None:
    """The final publication too (the docs say every one): an upstream's ``usage`` of
    6 KiB made a 6 KiB end under a 4 KiB limit; it is left out past the limit."""
    server = await start_gateway(max_message_bytes=1024)
    channel = new_channel()
    async with api_client(server) as http, ws_client(server) as c:
        await c.subscribe(channel)
        await start_relay(http, channel, fake_usage_bytes=6000)
        got = await ws_until_final(c, channel)
    assert joined(got) == "".join(TOKENS)
    assert got[-1]["data"] == {"type": "end", "finish_reason": None, "usage": {}}


async def test_a_streamed_publish_naming_two_channels_is_400(server: RunningServer) -> None:
    """``?channel=a&channel=b`` published to b, the last, and said nothing."""
    first, second = new_channel(), new_channel()
    async with api_client(server) as http:
        r = await http.post(
            "/api/publish/stream",
            params=[("channel", first), ("channel", second)],
            content=b'{"n": 1}\n',
            headers={**bearer(), "content-type": "application/x-ndjson"},
        )
        assert r.status_code == 400, r.text
        assert r.json()["error"] == {
            "code": "bad_request",
            "message": "one 'channel' per streamed publish",
        }
        for channel in (first, second):
            assert (await api_history(http, channel))["publications"] == []


async def test_streamed_publish_to_a_forbidden_channel_is_403_and_bad_token_is_401(
    server: RunningServer,
) -> None:
    channel = new_channel()
    async with api_client(server) as http:
        other = token("writer", publish=["other:*"])
        r = await publish_stream(http, channel, ndjson([1, 2]), tok=other)
        assert r.status_code == 403, r.text
        assert r.json()["error"]["code"] == "forbidden"
        r = await publish_stream(http, channel, ndjson([1, 2]), tok="not-a-jwt")
        assert r.status_code == 401, r.text
        assert r.json()["error"]["code"] == "unauthorized"
        assert (await api_history(http, channel))["publications"] == []


async def test_streamed_publish_from_a_backend_that_disconnects_keeps_its_lines_quietly(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Regression: a backend that went away mid-body made the gateway log
    "Exception in ASGI application" with a ClientDisconnect traceback."""
    caplog.set_level(logging.INFO, logger="gateway.llm.routes")
    channel = new_channel()
    never = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield ndjson([{"n": 1}, {"n": 2}])
        await never.wait()
        yield b"{}"

    async with api_client(server) as http:
        request = asyncio.create_task(publish_stream(http, channel, body()))
        await eventually(lambda: server.gateway.hub.stats.publications_in >= 2)
        request.cancel()  # the backend dies: its connection closes mid-body
        with pytest.raises(asyncio.CancelledError):
            await request
        history = await api_history(http, channel)
        assert [p["data"] for p in history["publications"]] == [{"n": 1}, {"n": 2}]
    # The handler has finished once it logs the disconnect; nothing was logged as an error.
    await eventually(lambda: any("client went away" in r.getMessage() for r in caplog.records))
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]


# --------------------------------------------------------------------------- the demo


async def test_llm_demo_page_is_served(server: RunningServer) -> None:
    async with api_client(server) as http:
        r = await http.get("/llm")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/html")
        for testid in ["prompt", "send", "answer", "status", "stop"]:
            assert f'data-testid="{testid}"' in r.text


async def test_dev_mode_demo_upstream_streams_tokens_and_can_be_stopped(make_server: Any) -> None:
    server = await make_server(jwt_secret="")
    dev = server.gateway.dev_token
    channel = new_channel()
    async with api_client(server) as http, ws_client(server, dev) as c:
        await c.subscribe(channel)
        body = {"channel": channel, "upstream": "demo", "request": chat_request()}
        r = await http.post("/api/streams", json=body, headers=bearer(dev))
        assert r.status_code == 202, r.text
        first = await c.publications(channel, 3)
        assert all(p["data"]["type"] == "token" for p in first)
        assert "hi" in first[0]["data"]["text"]  # the demo echoes the prompt
        r = await http.delete(f"/api/streams/{r.json()['stream_id']}", headers=bearer(dev))
        assert r.status_code == 200
        rest = await ws_until_final(c, channel)
        assert rest[-1]["data"]["type"] == "error", rest[-1]
