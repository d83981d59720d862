"""The Python client's read-only SSE mode (cursor resume, gaps, token renewal) and its
HTTP publisher (publish, broadcast, NDJSON streamed publish) against a real gateway."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.errors import CloseCode
from gatewayclient import (
    Gap,
    GatewayError,
    Item,
    Publication,
    Publisher,
    SseClient,
    StateChange,
    connect,
)
from gatewayclient.tokens import token_exp
from tests.conftest import MakeServer, eventually, token
from tests.helpers import silent_server


async def take(source: SseClient, count: int, timeout: float = 5.0) -> list[Item]:
    return [await source.get(timeout) for _ in range(count)]


def changes(states: list[StateChange]) -> list[tuple[str, int | None]]:
    return [(s.state, s.code) for s in states]


def offsets(items: list[Item], channel: str) -> list[tuple[int, Any]]:
    return [
        (i.offset, i.data) for i in items if isinstance(i, Publication) and i.channel == channel
    ]


# --------------------------------------------------------------------------- SSE


async def test_sse_resumes_from_a_stored_cursor(server):
    async with Publisher(server.url, token("backend")) as api:
        sse = SseClient(server.url, ["a", "b"], token=token("reader"))
        await sse.start()
        await api.publish("a", 1)
        await api.publish("b", 1)
        first = await take(sse, 2)
        assert offsets(first, "a") == offsets(first, "b") == [(1, 1)]
        cursor = sse.cursor
        await sse.close()
        assert cursor is not None
        for n in (2, 3):
            await api.publish("a", n)
            await api.publish("b", n)
        async with SseClient(server.url, ["a", "b"], token=token("reader"), cursor=cursor) as again:
            items = await take(again, 4)
            assert offsets(items, "a") == [(2, 2), (3, 3)]
            assert offsets(items, "b") == [(2, 2), (3, 3)]
            await api.publish("a", 4)
            assert offsets(await take(again, 1), "a") == [(4, 4)]


async def test_sse_delivers_text_with_the_line_breaks_json_strings_hold_raw(server):
    """U+2028, U+2029 and U+0085 are written raw in a JSON string (the gateway's events
    hold them so): httpx's line reader ended a line at each, the event's JSON was cut
    in two and dropped, and the cursor moved past it."""
    texts = ["a", "line\u2028sep", "para\u2029sep", "nel\u0085x", "ff\x0cx", "z"]
    reader = SseClient(server.url, ["llm"], token=token("reader"))
    async with Publisher(server.url, token("backend")) as api, reader as sse:
        for text in texts:
            await api.publish("llm", {"text": text})
        items = await take(sse, len(texts))
    assert [data["text"] for _, data in offsets(items, "llm")] == texts


async def test_sse_reconnects_by_itself_with_last_event_id(server):
    """The server ends the stream; the client reopens it with its cursor, and what was
    published in between arrives once, in order; ``on_state`` saw the stream go and come
    back."""
    states: list[StateChange] = []
    async with (
        Publisher(server.url, token("backend")) as api,
        SseClient(
            server.url, ["news"], token=token(), min_reconnect_delay=2.0, on_state=states.append
        ) as sse,
    ):
        await api.publish("news", 1)
        assert offsets(await take(sse, 1), "news") == [(1, 1)]
        for session in list(server.gateway.hub.sessions):
            session.close(CloseCode.SERVICE_RESTART)
        await eventually(lambda: not server.gateway.hub.sessions)
        for n in range(2, 6):
            await api.publish("news", n)
        assert sse.connections == 1  # all published before the stream was reopened
        items = await take(sse, 4, timeout=10)
        assert sse.connections == 2
        assert offsets(items, "news") == [(n, n) for n in range(2, 6)]
        await api.publish("news", 6)
        assert offsets(await take(sse, 1), "news") == [(6, 6)]
    assert changes(states) == [
        ("connecting", None),
        ("connected", None),
        ("disconnected", None),
        ("connecting", None),
        ("connected", None),
        ("closed", None),
    ]
    assert states[2].reason == "the stream ended" and states[1].url == server.url


async def test_sse_gap_when_history_is_gone(make_server: MakeServer) -> None:
    gw = await make_server(history_size=2)
    async with Publisher(gw.url, token("backend")) as api:
        async with SseClient(gw.url, ["news"], token=token()) as sse:
            await api.publish("news", 1)
            await take(sse, 1)
            cursor = sse.cursor
        for n in range(2, 7):
            await api.publish("news", n)
        async with SseClient(gw.url, ["news"], token=token(), cursor=cursor) as again:
            gap = await again.get(5)
            assert isinstance(gap, Gap)
            assert (gap.reason, gap.last_offset, gap.offset) == ("history", 1, 6)
            await api.publish("news", 7)
            assert offsets(await take(again, 1), "news") == [(7, 7)]


async def test_sse_refusal_is_raised(server):
    states: list[StateChange] = []
    sse = SseClient(
        server.url, ["secret"], token=token(subscribe=["public"]), on_state=states.append
    )
    with pytest.raises(GatewayError) as refused:
        await sse.start()
    assert (refused.value.code, refused.value.status) == ("forbidden", 403)
    await sse.close()
    assert changes(states) == [("connecting", None), ("closed", 403)]


async def test_async_with_closes_a_client_whose_stream_did_not_open(server):
    """``async with`` that raised left the client's own HTTP client open (and, for a
    stream that was still trying, its task retrying for good)."""
    sse = SseClient(server.url, ["secret"], token=token(subscribe=["public"]))
    with pytest.raises(GatewayError):
        async with sse:
            raise AssertionError("opened")
    assert sse.http.is_closed


async def test_a_silent_stream_is_reopened_after_the_stall_timeout() -> None:
    """A server that accepted the connection and never answers (or a proxy that stopped
    forwarding): the client waited on it for good (its read timeout was None); now it
    gives up after ``stall_timeout`` and tries again."""
    async with silent_server() as silent:
        sse = SseClient(
            silent.url,
            ["news"],
            token=token(),
            stall_timeout=0.3,
            min_reconnect_delay=0.05,
            max_reconnect_delay=0.1,
        )
        opening = asyncio.ensure_future(sse.start(timeout=30))
        try:
            await eventually(lambda: len(silent.accepted) >= 3, timeout=10)
            assert not opening.done()
        finally:
            await sse.close()
            opening.cancel()


async def test_sse_switches_to_a_new_token_before_expiry_losing_and_repeating_nothing(
    make_server: MakeServer,
) -> None:
    """Tokens of 4 s: halfway through each, the client opens a stream with a new one from
    its cursor, switches to it and closes the old one, while publications flow on two
    channels. Each arrives once, in order, and the stream never dropped."""
    gw = await make_server(jwt_leeway=0)
    made: list[str] = []
    states: list[StateChange] = []

    async def factory() -> str:
        made.append(token("reader", ttl=4))
        return made[-1]

    async with (
        Publisher(gw.url, token("backend")) as api,
        SseClient(gw.url, ["a", "b"], token_factory=factory, on_state=states.append) as sse,
    ):

        async def publish_until_two_switches() -> int:
            n = 0
            while sse.switches < 2:
                n += 1
                await api.publish("a", n)
                await api.publish("b", n)
                await asyncio.sleep(0.01)  # a steady trickle, not a synchronisation
            return n

        count = await asyncio.wait_for(publish_until_two_switches(), 20)
        items = await take(sse, 2 * count, timeout=10)
        for channel in ("a", "b"):
            assert offsets(items, channel) == [(n, n) for n in range(1, count + 1)]
        assert not [i for i in items if isinstance(i, Gap)]
        # Nothing more: a repeat would come before this one.
        await api.publish("a", "last")
        assert offsets(await take(sse, 1), "a") == [(count + 1, "last")]
        assert len(made) == 3 and sse.connections == 3 and sse.switches == 2
        # Each new stream started from what was delivered: it had nothing to repeat.
        assert sse.repeats == 0
        # The old streams were closed: the gateway holds the last one only.
        await eventually(lambda: len(gw.gateway.hub.sessions) == 1)
    assert changes(states) == [("connecting", None), ("connected", None), ("closed", None)]


async def test_sse_reconnects_with_a_new_token_when_the_stream_ends_at_expiry(
    make_server: MakeServer,
) -> None:
    """No switch (the token service is down until the token expired): the stream ends at
    the token's expiry, and the client reopens it with a new token, from its cursor."""
    gw = await make_server(jwt_leeway=0)
    made: list[str] = []

    async def factory() -> str:
        if made and time.time() < (token_exp(made[-1]) or 0):
            raise RuntimeError("the token service is down until the token expired")
        made.append(token("reader", ttl=5))
        return made[-1]

    async with (
        Publisher(gw.url, token("backend")) as api,
        SseClient(gw.url, ["news"], token_factory=factory) as sse,
    ):
        await api.publish("news", 1)
        await eventually(lambda: sse.connections >= 2, timeout=15)
        assert len(made) == 2 and sse.switches == 0
        await api.publish("news", 2)
        assert offsets(await take(sse, 2), "news") == [(1, 1), (2, 2)]


# --------------------------------------------------------------------------- publisher


async def test_publish_broadcast_history_and_presence_over_http(server):
    async with (
        Publisher(server.url, token("backend")) as api,
        connect(server.url, token=token("alice")) as alice,
    ):
        await alice.subscribe("chat:x")
        first = await api.publish("news", {"n": 1})
        assert first.offset == 1
        results = await api.broadcast(["news", "other"], {"n": 2})
        assert [r.offset for r in results] == [2, 1]
        page = await api.history("news", since_offset=1)
        assert [(p.offset, p.data) for p in page.publications] == [(2, {"n": 2})]
        assert page.offset == 2 and page.epoch == first.epoch
        assert [c["user"] for c in await api.presence("chat:x")] == ["alice"]
    async with Publisher(server.url, token("backend", publish=["news"])) as limited:
        with pytest.raises(GatewayError) as refused:
            await limited.broadcast(["news", "other"], 1)
        assert (refused.value.code, refused.value.status) == ("forbidden", 403)
        assert (await limited.history("other")).offset == 1  # nothing more was published


async def test_a_publish_retried_with_an_idempotency_key_is_published_once(server):
    async with Publisher(server.url, token("backend")) as api:
        first = await api.publish("once", {"n": 1}, idempotency_key="job-1")
        assert await api.publish("once", {"n": 1}, idempotency_key="job-1") == first
        results = await api.broadcast(["once", "also"], 2, idempotency_key="job-1")
        assert [r.offset for r in results] == [first.offset, 1]
        assert await api.broadcast(["once", "also"], 2, idempotency_key="job-1") == results
        assert (await api.history("once")).offset == first.offset == 1
        assert (await api.publish("once", 3)).offset == 2


async def test_publish_stream_publishes_each_item_as_it_is_produced(server):
    """The generator waits until the subscriber received each item before producing the
    next: the stream would hang if the publisher buffered the body."""
    async with (
        Publisher(server.url, token("backend")) as api,
        connect(server.url, token=token()) as client,
    ):
        sub = await client.subscribe("gen:1")

        async def tokens() -> AsyncIterator[dict[str, str]]:
            for word in ("The", " answer", " is", " 42"):
                yield {"type": "token", "text": word}
                got = await sub.get(5)
                assert isinstance(got, Publication) and got.data["text"] == word

        result = await asyncio.wait_for(api.publish_stream("gen:1", tokens()), 20)
        assert (result.published, result.offset) == (4, 4)


async def test_a_refused_stream_line_says_what_was_published(server):
    async def lines() -> AsyncIterator[Any]:
        yield 1
        yield 2
        yield "x" * 70_000  # over GATEWAY_MAX_MESSAGE_BYTES

    async with Publisher(server.url, token("backend")) as api:
        with pytest.raises(GatewayError) as refused:
            await api.publish_stream("gen:2", lines())
        assert (refused.value.code, refused.value.status) == ("too_large", 413)
        assert refused.value.details["published"] == 2
        assert (await api.history("gen:2")).offset == 2
