"""An SSE stream across a channel's lost history (Redis emptied while it is open): the
gap's id is a cursor that resumes the new epoch, so a client that drops right after
the gap loses nothing that history holds."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
from redis.asyncio import Redis

from gateway import cursor
from tests.conftest import MakeServer, token
from tests.redis_server import RedisServer


async def events(response: httpx.Response) -> AsyncIterator[dict[str, str]]:
    """The stream's events as their fields (comments and the opening's retry skipped)."""
    fields: dict[str, str] = {}
    async for line in response.aiter_lines():
        if line:
            name, _, value = line.partition(": ")
            if name:
                fields[name] = value
            continue
        if "data" in fields or fields.get("event") == "gap":
            yield fields
        fields = {}


async def publish(http: httpx.AsyncClient, channel: str, data: Any) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token('backend')}"}
    reply = await http.post(
        "/api/publish", json={"channel": channel, "data": data}, headers=headers
    )
    assert reply.status_code == 200, reply.text
    result: dict[str, Any] = reply.json()
    return result


async def test_a_new_epochs_gap_carries_the_cursor_of_the_new_epochs_start(
    make_server: MakeServer, own_redis_server: RedisServer
) -> None:
    gw = await make_server(broker_url=own_redis_server.url)
    stream_url = f"/sse?channel=f1&channel=f2&token={token()}"
    async with httpx.AsyncClient(base_url=gw.url, timeout=10, trust_env=False) as http:
        async with http.stream("GET", stream_url) as response:
            seen = events(response)
            old = [await publish(http, "f1", n) for n in range(3)]
            await publish(http, "f2", "x")
            for _ in range(4):
                await anext(seen)
            admin = Redis.from_url(own_redis_server.url)
            await admin.flushall()
            await admin.aclose()
            new1 = await publish(http, "f1", "new1")
            assert new1["offset"] == 1 and new1["epoch"] != old[0]["epoch"]
            gap = await anext(seen)
            assert (gap["event"], orjson.loads(gap["data"])) == ("gap", {"channel": "f1"})
            after = cursor.decode(gap["id"])["f1"]
            assert (after.offset, after.epoch) == (0, new1["epoch"])
            pushed = await anext(seen)
            assert orjson.loads(pushed["data"])["data"] == "new1"
        # The client dropped right after the gap: it resumes from the gap's id.
        new2 = await publish(http, "f1", "new2")
        headers = {"Last-Event-ID": gap["id"]}
        async with http.stream("GET", stream_url, headers=headers) as response:
            got = []
            async for fields in events(response):
                got.append((fields.get("event"), orjson.loads(fields["data"])))
                if len(got) == 3:
                    break
    f1 = [(event, data) for event, data in got if data["channel"] == "f1"]
    assert [(event, data["offset"], data["data"]) for event, data in f1] == [
        (None, 1, "new1"),
        (None, 2, "new2"),
    ]
    assert f1[1][1]["epoch"] == new2["epoch"]
    # f2 lost its history too and nothing of it was published since: a gap of its own.
    assert [(event, data) for event, data in got if data["channel"] == "f2"] == [
        ("gap", {"channel": "f2"})
    ]
