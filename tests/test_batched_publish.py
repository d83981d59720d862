"""Publications that arrive together leave together: the lines of one NDJSON chunk, the
tokens of one chunk from an LLM upstream. Through the real app on a real Redis, with
Redis's own count of script calls (``INFO commandstats``) and real WebSocket and SSE
subscribers checking that each publication arrives once, in order.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from tests.conftest import RunningServer
from tests.fake_upstream import serve_fake_upstream
from tests.helpers import api_client, api_history, bearer, open_sse, ws_client
from tests.redis_server import RedisServer, script_calls
from tests.test_llm import gen, ndjson, new_channel, publish_stream, start_relay, ws_until_final


@pytest.fixture
async def redis_gateway(
    make_server: Any, redis_server: RedisServer, redis_prefix: str
) -> RunningServer:
    server: RunningServer = await make_server(
        broker_url=redis_server.url,
        broker_prefix=redis_prefix,
        client_queue_bytes=64 * 1024 * 1024,
    )
    # Every script loaded, so that each publish below is one EVALSHA.
    hub = server.gateway.hub
    await hub.publish_many("warm-up", [b"1", b"2"])
    await hub.publish("warm-up", b"3")
    return server


async def test_a_big_body_in_one_chunk_is_published_in_a_few_script_calls(
    redis_gateway: RunningServer, redis_server: RedisServer
) -> None:
    channel = new_channel()
    values = [{"i": i} for i in range(1000)]
    body = ndjson(values)  # about 10 KB: one chunk, or a few at most
    async with api_client(redis_gateway) as http:
        before = await script_calls(redis_server)
        r = await publish_stream(http, channel, gen([body]))
        calls = await script_calls(redis_server) - before
        assert r.status_code == 200, r.text
        assert r.json() == {"published": 1000, "offset": 1000, "epoch": r.json()["epoch"]}
        # 1000 lines: 4 calls of at most 256 per chunk the server read; one per line before.
        assert 4 <= calls <= 12, calls
        history = await api_history(http, channel)
        assert [p["data"] for p in history["publications"]] == values[-100:]
        assert [p["offset"] for p in history["publications"]] == list(range(901, 1001))


async def test_a_bad_line_in_the_middle_of_a_chunk_publishes_only_the_lines_before_it(
    redis_gateway: RunningServer, redis_server: RedisServer
) -> None:
    channel = new_channel()
    lines = [b'{"n": 1}', b'{"n": 2}', b"", b'{"n": 4}', b'{"n": 5', b'{"n": 6}', b"7"]
    async with api_client(redis_gateway) as http, ws_client(redis_gateway) as c:
        await c.subscribe(channel)
        before = await script_calls(redis_server)
        r = await publish_stream(http, channel, gen([b"\n".join(lines) + b"\n"]))
        assert await script_calls(redis_server) == before + 1  # lines 1, 2 and 4 together
        assert r.status_code == 400, r.text
        reply = r.json()
        assert reply["error"]["code"] == "bad_request"
        assert "line 5" in reply["error"]["message"], reply
        assert (reply["published"], reply["offset"]) == (3, 3), reply
        got = await c.publications(channel, 3)
        assert [p["data"] for p in got] == [{"n": 1}, {"n": 2}, {"n": 4}]
        history = await api_history(http, channel)
        assert [p["data"] for p in history["publications"]] == [{"n": 1}, {"n": 2}, {"n": 4}]
        marker = await http.post(
            "/api/publish", json={"channel": channel, "data": "marker"}, headers=bearer()
        )
        assert marker.json()["offset"] == 4  # nothing of line 6 or 7 went out
        [push] = await c.publications(channel, 1)
        assert push["data"] == "marker"


async def test_a_line_over_the_limit_after_good_lines_of_its_chunk_keeps_them(
    make_server: Any, redis_server: RedisServer, redis_prefix: str
) -> None:
    server = await make_server(
        broker_url=redis_server.url, broker_prefix=redis_prefix, max_message_bytes=256
    )
    channel = new_channel()
    body = ndjson([{"n": 1}, {"n": 2}]) + b'{"text": "' + b"x" * 1000  # no end: over 256
    async with api_client(server) as http:
        r = await publish_stream(http, channel, gen([body]))
        assert r.status_code == 413, r.text
        reply = r.json()
        assert "line 3" in reply["error"]["message"] and reply["published"] == 2, reply
        history = await api_history(http, channel)
        assert [p["data"] for p in history["publications"]] == [{"n": 1}, {"n": 2}]


def chunked(values: list[Any]) -> list[bytes]:
    """``values`` as NDJSON in chunks of 1 to 300 lines, some cut mid-line."""
    body = ndjson(values)
    chunks, i, k = [], 0, 0
    while i < len(body):
        size = [5_000, 17, 40, 3_000, 1, 12_000, 300][k % 7]
        chunks.append(body[i : i + size])
        i, k = i + size, k + 1
    return chunks


async def test_subscribers_receive_every_batched_line_once_in_order_over_ws_and_sse(
    redis_gateway: RunningServer,
) -> None:
    channel = new_channel()
    values = [{"i": i, "text": f"tok{i}"} for i in range(3000)]
    async with (
        api_client(redis_gateway) as http,
        ws_client(redis_gateway) as c,
        open_sse(http, [channel]) as s,
    ):
        await c.subscribe(channel)
        await s.event()  # the stream is open
        # Two producers at once: the streamed body and single publishes to the same channel.
        streamed = asyncio.create_task(publish_stream(http, channel, gen(chunked(values))))
        singles = [
            await http.post(
                "/api/publish", json={"channel": channel, "data": {"single": n}}, headers=bearer()
            )
            for n in range(20)
        ]
        r = await streamed
        assert r.status_code == 200, r.text
        assert r.json()["published"] == 3000
        total = 3020
        ws = await c.publications(channel, total, timeout=30)
        sse = [e["json"] for e in await s.publications(total, timeout=30)]
    for got in (ws, sse):
        assert [p["offset"] for p in got] == list(range(1, total + 1))
        assert [p["data"] for p in got if "i" in p["data"]] == values
        assert [p["data"]["single"] for p in got if "single" in p["data"]] == list(range(20))
    single_offsets = {reply.json()["offset"] for reply in singles}
    assert single_offsets == {p["offset"] for p in ws if "single" in p["data"]}


# -- the LLM relay ------------------------------------------------------------------


@pytest.fixture
async def relay_gateway(
    make_server: Any, redis_server: RedisServer, redis_prefix: str
) -> AsyncIterator[RunningServer]:
    async with serve_fake_upstream() as upstream:
        upstreams = {"fake": {"url": upstream.url, "timeout": 5}}
        server: RunningServer = await make_server(
            broker_url=redis_server.url,
            broker_prefix=redis_prefix,
            llm_upstreams=orjson.dumps(upstreams).decode(),
        )
        await server.gateway.hub.publish_many("warm-up", [b"1", b"2"])
        await server.gateway.hub.publish("warm-up", b"3")
        yield server


async def test_tokens_that_arrive_together_are_published_together_end_last(
    relay_gateway: RunningServer, redis_server: RedisServer
) -> None:
    channel = new_channel()
    words = [f" w{i}" for i in range(60)]
    async with api_client(relay_gateway) as http, ws_client(relay_gateway) as c:
        await c.subscribe(channel)
        before = await script_calls(redis_server)
        await start_relay(http, channel, fake_tokens=words, fake_burst=True)
        got = await ws_until_final(c, channel)
        calls = await script_calls(redis_server) - before
    assert [p["data"] for p in got[:-1]] == [{"type": "token", "text": w} for w in words]
    assert got[-1]["data"]["type"] == "end", got[-1]
    assert [p["offset"] for p in got] == list(range(1, 62))
    # The upstream wrote the 60 token lines in one chunk: one call for them (a call per
    # token before), one for the end.
    assert 2 <= calls <= 4, calls


async def test_a_token_holding_a_line_separator_is_relayed_whole(
    relay_gateway: RunningServer,
) -> None:
    """Regression: lines were split like ``str.splitlines``, also at U+2028 and U+0085,
    which orjson (and many servers) write raw inside JSON strings: the token's line
    became two pieces of invalid JSON and the answer ended in an error."""
    channel = new_channel()
    words = ["a\u2028b", " c\u0085d", " e\x1cf"]
    async with api_client(relay_gateway) as http, ws_client(relay_gateway) as c:
        await c.subscribe(channel)
        await start_relay(http, channel, fake_tokens=words)
        got = await ws_until_final(c, channel)
    assert [p["data"] for p in got] == [
        *({"type": "token", "text": w} for w in words),
        got[-1]["data"],
    ]
    assert got[-1]["data"]["type"] == "end", got[-1]
