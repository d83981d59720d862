"""The Python client's pure parts: backoff bounds, reading a token's ``exp``, when to
refresh, URLs, the SSE parser and cursor, the item queue and a subscription's
deduplication."""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator

import pytest

from gatewayclient import Gap, GatewayError, Position, Publication
from gatewayclient.items import ItemQueue
from gatewayclient.sse import cursor_positions, sse_blocks, sse_lines
from gatewayclient.subscription import Subscription
from gatewayclient.tokens import backoff, refresh_delay, token_exp
from gatewayclient.wire import websocket_url
from tests.conftest import token


def test_backoff_is_equal_jitter_under_the_cap() -> None:
    for attempt in range(40):
        ceiling = min(20.0, 0.5 * 2**attempt)
        for _ in range(20):
            assert ceiling / 2 <= backoff(attempt, 0.5, 20.0) <= ceiling


def test_token_exp_and_refresh_delay() -> None:
    now = time.time()
    long = token(ttl=3600)
    exp = token_exp(long)
    assert exp is not None and abs(exp - (now + 3600)) < 5
    assert abs((refresh_delay(long, 30, now) or 0) - 3570) < 5
    short = token(ttl=20)  # shorter than twice 30 s: halfway
    assert abs((refresh_delay(short, 30, now) or 0) - 10) < 5
    assert token_exp(token(ttl=None)) is None and token_exp("not.a-jwt") is None
    assert refresh_delay("garbage", 30) is None


def test_websocket_url_keeps_a_path_prefix_and_quotes_the_token() -> None:
    assert websocket_url("https://gw.example/rt/", "a+b") == "wss://gw.example/rt/ws?token=a%2Bb"
    assert websocket_url("ws://127.0.0.1:8000", "t") == "ws://127.0.0.1:8000/ws?token=t"


async def lines(*items: str) -> AsyncIterator[str]:
    for item in items:
        yield item


async def test_sse_blocks_and_cursor() -> None:
    raw = [
        "retry: 1000",
        "id: a~e1~3",
        "",
        ": ping",
        "event: gap",
        "id: x",
        "data: {",
        "data: }",
        "",
    ]
    blocks = [b async for b in sse_blocks(lines(*raw))]
    assert blocks == [
        {"retry": "1000", "id": "a~e1~3"},
        {"event": "gap", "id": "x", "data": "{\n}"},
    ]
    assert cursor_positions("a~e1~3,b.c~e2~0") == {
        "a": Position("e1", 3),
        "b.c": Position("e2", 0),
    }
    assert cursor_positions("opaque") == {}


@pytest.mark.parametrize("seed", range(20))
async def test_sse_lines_end_at_crlf_lf_and_cr_only_however_the_stream_is_cut(seed: int) -> None:
    """Split as the SSE standard splits (not at U+2028, U+2029, U+0085, a form feed or
    any other break ``str.splitlines`` knows, which JSON strings may hold raw), with
    a CRLF across two reads one line end, and a last line with no end left out."""
    rng = random.Random(seed)
    inside = "a\u2028b\u2029c\u0085d\x0ce\x1cf"
    stream = f"data: {inside}\r\nid: 1\r\rdata: x\ndata: y\n\n: ping\r\ntail"
    cuts = sorted(rng.sample(range(1, len(stream)), rng.randint(1, 12)))
    pieces = [stream[i:j] for i, j in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    got = [line async for line in sse_lines(lines(*pieces))]
    assert got == [f"data: {inside}", "id: 1", "", "data: x", "data: y", "", ": ping"]


async def test_a_subscription_drops_repeats_and_reports_a_new_epoch() -> None:
    sub = Subscription("a", Position("e1", 2))
    for offset in (1, 2, 3, 3):
        sub.on_push({"channel": "a", "offset": offset, "epoch": "e1", "data": offset})
    sub.on_push({"channel": "a", "offset": 1, "epoch": "e2", "data": "new"})
    assert await sub.get(1) == Publication("a", 3, "e1", 3)
    assert await sub.get(1) == Gap("a", "epoch", "e1", 3, "e2", 0)
    assert await sub.get(1) == Publication("a", 1, "e2", "new")
    assert sub.repeats == 3
    sub.end()
    assert [item async for item in sub] == []


async def test_the_item_queue_ends_once_and_for_every_reader() -> None:
    queue = ItemQueue("it ended")
    with pytest.raises(TimeoutError):
        await queue.get(0.01)
    pub = Publication("a", 1, "e1", None)
    queue.put(pub)
    queue.fail(GatewayError("forbidden"))
    queue.end()  # after the end: ignored, as are items
    queue.put(pub)
    assert await queue.get(1) == pub
    for _ in range(2):
        with pytest.raises(GatewayError) as failed:
            await queue.next()
        assert failed.value.code == "forbidden"
    ended = ItemQueue("it ended")
    ended.end()
    with pytest.raises(StopAsyncIteration):
        await ended.next()
    with pytest.raises(GatewayError) as closed:
        await ended.get(1)
    assert (closed.value.code, closed.value.message) == ("closed", "it ended")


def test_the_publisher_gives_up_idle_connections_before_the_gateway_closes_them() -> None:
    """Both at 5 s, a publish sent as the server closed its idle connection failed with a
    ReadError without reaching it (seen in CI); the client's expiry stays below the
    keep-alive timeout the gateway's uvicorn configuration gives."""
    import uvicorn

    from gateway.server.options import uvicorn_options
    from gateway.settings import Settings
    from gatewayclient.publisher import KEEPALIVE_EXPIRY, Publisher

    config = uvicorn.Config(
        "gateway.app:create_app", **uvicorn_options(Settings(jwt_secret="x" * 32))
    )
    assert config.timeout_keep_alive > KEEPALIVE_EXPIRY
    publisher = Publisher("http://127.0.0.1:1", token("backend"))
    pool = publisher.http._transport._pool  # type: ignore[attr-defined]
    assert pool._keepalive_expiry == KEEPALIVE_EXPIRY
