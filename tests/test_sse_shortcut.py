"""``GET /sse`` opened by ``sse.Shortcut`` instead of the framework's route.

The shortcut takes a request only when every check of the endpoint passes, and must
then answer exactly what the endpoint answers. Each request of a table is sent twice
over a raw socket to the same server: once as it comes (the shortcut), once with the
shortcut declining everything (the route), and the two answers (status line, headers
but the date, the stream's opening, or an error's body) must be the same bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Awaitable
from typing import Any

import pytest

from gateway import sse
from tests.conftest import MakeServer, eventually, token
from tests.redis_server import RedisServer

DATE = re.compile(rb"(?im)^date: [^\r\n]*\r\n")
TIMEOUT = 5.0


def request(target: str, headers: list[tuple[str, str]] | None = None) -> bytes:
    lines = [f"GET {target} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{name}: {value}" for name, value in headers or []]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def answer(port: int, raw: bytes) -> bytes:
    """The response head without its date, then the first chunk of a stream or the
    whole body of an error."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        length = re.search(rb"(?i)content-length: (\d+)", head)
        if length:
            body = await asyncio.wait_for(reader.readexactly(int(length[1])), TIMEOUT)
        else:  # chunked: the opening is the first chunk
            size = await asyncio.wait_for(reader.readuntil(b"\r\n"), TIMEOUT)
            body = size + await reader.readexactly(int(size, 16) + 2)
        return DATE.sub(b"", head) + body
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def cases(cursor: str) -> dict[str, bytes]:
    tok = token()
    only_a = token(subscribe=["a*"])
    return {
        "one channel": request(f"/sse?channel=news&token={tok}"),
        "two channels, one twice": request(f"/sse?channel=a1&channel=b1&channel=a1&token={tok}"),
        "from an origin": request(f"/sse?channel=news&token={tok}", [("Origin", "https://x.io")]),
        "token in the header": request("/sse?channel=news", [("Authorization", f"Bearer {tok}")]),
        "Last-Event-ID": request(f"/sse?channel=news&token={tok}", [("Last-Event-ID", cursor)]),
        "last_event_id": request(f"/sse?channel=news&token={tok}&last_event_id={cursor}"),
        "percent-encoded": request(f"/sse?%63hannel=n%65ws&token={tok}"),
        "no channel": request(f"/sse?token={tok}"),
        "bad channel": request(f"/sse?channel=a%20b&token={tok}"),
        "forbidden": request(f"/sse?channel=news&token={only_a}"),
        "no token": request("/sse?channel=news", [("Origin", "https://x.io")]),
        "bad token": request("/sse?channel=news&token=nope"),
        "bad cursor": request(f"/sse?channel=news&token={tok}", [("Last-Event-ID", "%%")]),
        "too many channels": request(
            "/sse?" + "&".join(f"channel=c{n}" for n in range(5)) + f"&token={tok}"
        ),
    }


async def test_the_shortcut_answers_what_the_route_answers(
    make_server: MakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = await make_server(
        max_channels_per_connection=4, allowed_origins="https://x.io,https://y.io"
    )
    taken: list[Any] = []
    original_open = sse.Shortcut._open

    def counted(self: sse.Shortcut, *args: Any) -> Awaitable[None]:
        taken.append(args[0]["query_string"])
        return original_open(self, *args)

    monkeypatch.setattr(sse.Shortcut, "_open", counted)
    # A cursor of a stream that saw nothing: the opening of a first stream on "news".
    first = await answer(server.port, request(f"/sse?channel=news&token={token()}"))
    cursor = re.search(rb"id: (\S+)", first)
    assert cursor is not None
    table = cases(cursor[1].decode())
    via_shortcut = {name: await answer(server.port, raw) for name, raw in table.items()}
    assert len(taken) == 1 + 7  # the streams the endpoint would open, and only those

    original_checked = sse.Shortcut._checked
    monkeypatch.setattr(sse.Shortcut, "_checked", lambda self, scope: None)
    via_route = {name: await answer(server.port, raw) for name, raw in table.items()}
    monkeypatch.setattr(sse.Shortcut, "_checked", original_checked)

    for name in table:
        assert via_shortcut[name] == via_route[name], name
    assert via_shortcut["one channel"].startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"access-control-allow-origin: https://x.io" in via_shortcut["from an origin"]
    assert via_shortcut["forbidden"].startswith(b"HTTP/1.1 403")
    await eventually(lambda: server.gateway.connections.open["sse"] == 0)


async def test_a_broker_down_while_subscribing_is_the_routes_503(
    make_server: MakeServer, own_redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every check passes, so the shortcut takes the stream; Redis is down, so the
    subscribe fails: the answer is the route's 503, CORS headers included."""
    server = await make_server(broker_url=own_redis_server.url)
    own_redis_server.stop()
    raw = request(f"/sse?channel=news&token={token()}", [("Origin", "https://x.io")])
    via_shortcut = await answer(server.port, raw)
    monkeypatch.setattr(sse.Shortcut, "_checked", lambda self, scope: None)
    assert via_shortcut == await answer(server.port, raw)
    assert via_shortcut.startswith(b"HTTP/1.1 503")
    assert b"access-control-allow-origin: *" in via_shortcut
    assert b'"code":"unavailable"' in via_shortcut
    assert server.gateway.connections.open["sse"] == 0
