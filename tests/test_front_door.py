"""The front door (``gateway.server.front``): a connection's first request head read by
a lean parser, a WebSocket upgrade answered from it, anything else handed to uvicorn's
protocol with every byte read so far.

The handshake tests (tests/test_handshake.py) send each request in one write. These send
heads over several reads, split where the front door keeps what it read (an Upgrade
header in the first read) and where it does not, and hold every answer against stock
uvicorn's; then what a connection leaves behind when it ends inside a head, times out
inside one, or sends a request before its upgrade.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import types

import httptools
import orjson
import pytest
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.server.front import FrontDoor
from gateway.server.handover import websocket_key
from gateway.server.head import FRONT_LIMIT, Head
from tests.conftest import MakeServer, RunningServer, eventually, token
from tests.helpers import client_text_frame, read_raw_frame, ws_client
from tests.test_handshake import (
    TIMEOUT,
    answer,
    change_one,
    standard,
    status,
    upgrade,
    upgrade_then_ping,
)
from tests.test_request_head_timeout import HEAD_TIMEOUT, ended_with

pytestmark = pytest.mark.gateway_protocols


def split(request: bytes, rng: random.Random) -> list[bytes]:
    """``request`` in 1 to 4 pieces; often the first holds the Upgrade header."""
    cuts = sorted(rng.sample(range(1, len(request)), rng.randrange(0, 4)))
    if cuts and rng.random() < 0.5:
        after = request.find(b"pgrade:")
        if after > 0:
            cuts = sorted({c for c in cuts if c > after + 8} | {after + 8})
    bounds = [0, *cuts, len(request)]
    return [request[a:b] for a, b in itertools.pairwise(bounds) if b > a]


async def test_heads_over_several_reads_get_what_stock_uvicorn_answers(
    stock_pair: tuple[RunningServer, RunningServer],
) -> None:
    rng = random.Random(20261204)
    upgrades = 0
    for _ in range(50):
        fields = standard()
        if rng.random() < 0.4:
            change_one(fields, rng, ["drop", "mangle", "case"])
        target = rng.choice(["/ws?token=" + token(), "/ws?token=" + token(), "/ws", "/x"])
        if rng.random() < 0.15:  # no upgrade at all: a plain request
            fields = [("Accept", "text/plain")]
            target = "/healthz"
        request = upgrade(target, headers=fields)
        pieces = split(request, rng)
        (ours, ours_closed), (stock, stock_closed) = [
            await answer(s.port, *pieces) for s in stock_pair
        ]
        assert status(ours) == status(stock), (pieces, ours, stock)
        assert ours_closed == stock_closed, pieces
        upgrades += status(ours) == b"HTTP/1.1 101 Switching Protocols"
    assert upgrades >= 10  # the table did exercise the answered path
    for server in stock_pair:
        await eventually(lambda s=server: s.gateway.connections.total == 0)  # type: ignore[misc]
        await eventually(lambda s=server: not s.server.server_state.connections)  # type: ignore[misc]


async def test_an_upgrade_answered_over_three_reads_works(server: RunningServer) -> None:
    request = upgrade(headers=standard())
    at = request.find(b"pgrade:") + 8
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        for piece in (request[:at], request[at : at + 30], request[at + 30 :]):
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.01)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        assert status(head) == b"HTTP/1.1 101 Switching Protocols"
        writer.write(client_text_frame(b'{"id": 7, "op": "ping"}'))
        reply = orjson.loads((await read_raw_frame(reader))[2:])
        assert reply == {"id": 7, "ok": True, "result": {}}
        protocols = [
            c for c in server.server.server_state.connections if not isinstance(c, FrontDoor)
        ]
        assert len(protocols) == 1  # the WebSocket; the front door left the set
    finally:
        writer.close()
    await eventually(lambda: server.gateway.connections.total == 0)
    await eventually(lambda: not server.server.server_state.connections)


async def test_frames_sent_behind_the_upgrade_in_one_write_are_read(server: RunningServer) -> None:
    """A client that does not wait for the 101 (RFC 6455 asks it to) and writes its first
    frames with the head: they are read after the upgrade is answered, not dropped."""
    frames = client_text_frame(b'{"id": 1, "op": "ping"}') + client_text_frame(
        b'{"id": 2, "op": "subscribe", "channel": "pipelined"}'
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(upgrade(headers=standard()) + frames)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        assert status(head) == b"HTTP/1.1 101 Switching Protocols"
        replies = [orjson.loads((await read_raw_frame(reader))[2:]) for _ in range(2)]
        assert [(r["id"], r["ok"]) for r in replies] == [(1, True), (2, True)]
        await eventually(lambda: server.gateway.hub.local_subscribers("pipelined") == 1)
    finally:
        writer.close()
    await eventually(lambda: server.gateway.connections.total == 0)


async def test_a_request_before_the_upgrade_on_one_connection(server: RunningServer) -> None:
    """The first request is uvicorn's; the upgrade after it on the same connection is
    answered there (``AnswersUpgrades``), as before the front door."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        assert status(first) == b"HTTP/1.1 200 OK"
        length = int(first.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        await upgrade_then_ping(reader, writer)
    finally:
        writer.close()
    await eventually(lambda: server.gateway.connections.total == 0)


async def read_response(reader: asyncio.StreamReader) -> bytes:
    """One HTTP response with a content-length, head and body."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    return head + await asyncio.wait_for(reader.readexactly(length), TIMEOUT)


@pytest.mark.parametrize("pace", ["one write", "a byte a write"])
async def test_an_upgrade_pipelined_behind_a_request_waits_for_its_response(
    server: RunningServer, pace: str
) -> None:
    """A request and an upgrade in one write (or trickled): the 101 went out before the
    first request's 200, whose bytes then landed in the WebSocket stream (read as frames:
    "close 21584"), and the socket was dead. Responses go out in request order."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        request = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" + upgrade(headers=standard())
        if pace == "one write":
            writer.write(request)
        else:
            for byte in request:
                writer.write(bytes([byte]))
                await writer.drain()
        first = await read_response(reader)
        assert status(first) == b"HTTP/1.1 200 OK", first
        assert first.endswith(b'{"status":"ok"}'), first
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        assert status(head) == b"HTTP/1.1 101 Switching Protocols", head
        writer.write(client_text_frame(b'{"id": 1, "op": "ping"}'))
        assert orjson.loads((await read_raw_frame(reader))[2:])["ok"] is True
    finally:
        writer.close()
    await eventually(lambda: server.gateway.connections.total == 0)


async def test_a_bad_request_behind_a_stream_does_not_break_into_it(
    server: RunningServer,
) -> None:
    """A ``GET /sse`` and a request httptools refuses, in one write: a 400 was written in
    the middle of the stream's chunked body (its channel live on the worker: the stream
    starts as the head is parsed). The stream is never cut into: either it does not
    start (uvicorn's 400 alone) or the connection ends after its own bytes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    async with ws_client(server) as live:
        await live.subscribe("a")
        writer.write(
            f"GET /sse?channel=a&token={token()}&last_event_id= HTTP/1.1\r\n"
            "Host: 127.0.0.1\r\n\r\nGET / TTP/1.1\r\n\r\n".encode()
        )
        got = b""
        try:
            while chunk := await asyncio.wait_for(reader.read(65536), TIMEOUT):
                got += chunk
        finally:
            writer.close()
    assert got.count(b"HTTP/1.1 ") == 1, got
    assert got.startswith((b"HTTP/1.1 200 OK", b"HTTP/1.1 400 Bad Request")), got


@pytest.mark.parametrize(
    ("extra", "body"),
    [
        ([("Content-Length", "36")], client_text_frame(b'{"id":"from-body","op":"ping"}')),
        ([("Content-Length", "0")], b""),
        ([("Transfer-Encoding", "chunked")], b"5\r\nhello\r\n0\r\n\r\n"),
    ],
    ids=["a frame as its body", "an empty body", "a chunked body"],
)
async def test_an_upgrade_with_a_body_is_refused_as_stock_uvicorn_refuses_it(
    stock_pair: tuple[RunningServer, RunningServer],
    extra: list[tuple[str, str]],
    body: bytes,
) -> None:
    """A body on a handshake was read as WebSocket frames (a command answered before any
    frame was sent). websockets refuses a request with a body: 400, in both modes."""
    statuses = []
    for server in stock_pair:
        head, _ = await answer(server.port, upgrade(headers=standard() + extra) + body)
        statuses.append(status(head))
    assert statuses[0] == statuses[1], statuses
    if body:
        assert statuses[0] == b"HTTP/1.1 400 Bad Request", statuses


async def test_two_origins_on_an_upgrade_are_refused_as_stock_uvicorn_refuses_them(
    make_server: MakeServer,
) -> None:
    """The first of two Origin headers was the one checked: allowed, then evil, got in."""
    for raw in (True, False):
        server = await make_server(allowed_origins="https://ok.example", raw_writes=raw)
        for origins in (["https://ok.example", "https://evil.example"], ["https://ok.example"] * 2):
            fields = standard() + [("Origin", origin) for origin in origins]
            head, _ = await answer(server.port, upgrade(headers=fields))
            assert status(head) == b"HTTP/1.1 400 Bad Request", (raw, origins, head)


async def test_a_client_leaving_inside_a_head_leaves_nothing(server: RunningServer) -> None:
    state = server.server.server_state
    request = upgrade(headers=standard())
    for cut in (request.find(b"pgrade:") + 8, 10, len(request) - 3):
        _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(request[:cut])
        await writer.drain()
        await eventually(lambda: len(state.connections) == 1)
        writer.close()
        await eventually(lambda: not state.connections)
    assert server.gateway.connections.total == 0


async def test_a_head_larger_than_the_front_door_keeps_is_uvicorns(
    stock_pair: tuple[RunningServer, RunningServer],
) -> None:
    """Past ``FRONT_LIMIT`` the front door stops keeping bytes; uvicorn's answer."""
    big = upgrade(headers=[*standard(), *[(f"X-{n}", "p" * 1000) for n in range(20)]])
    assert len(big) > FRONT_LIMIT
    for pieces in ([big], [big[:200], big[200:]]):
        (ours, ours_closed), (stock, stock_closed) = [
            await answer(s.port, *pieces) for s in stock_pair
        ]
        assert status(ours) == status(stock) and ours_closed == stock_closed


async def test_a_kept_head_that_stalls_gets_the_408(make_server: MakeServer) -> None:
    server = await make_server(request_head_timeout=HEAD_TIMEOUT)
    request = upgrade(headers=standard())
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(request[: request.find(b"pgrade:") + 20])  # kept by the front door
    answer = await ended_with(reader)
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    await eventually(lambda: not server.server.server_state.connections)
    writer.close()


def fed(request: bytes) -> tuple[Head, httptools.HttpRequestParser] | None:
    """A ``Head`` and its parser fed ``request``; None when the parser refuses it."""
    head = Head()
    parser = httptools.HttpRequestParser(head)
    try:
        parser.feed_data(request)
    except httptools.HttpParserUpgrade:
        pass
    except httptools.HttpParserError:
        return None
    return head, parser


def test_the_version_read_from_the_request_line_is_the_parsers() -> None:
    """``Head.http11`` reads HTTP/1.1 from a plain request line and asks the parser for
    anything else: its answer is the parser's for every head the parser takes."""
    rng = random.Random(20261205)
    versions = ["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/0.9", "HTTP/1.2", " HTTP/1.1"]
    targets = ["/ws", "/ws?token=" + token(), "/ws?v=HTTP/1.1", "/ws?v=%20HTTP/1.1", "*"]
    parsed = {True: 0, False: 0}
    for _ in range(400):
        request = upgrade(rng.choice(targets), version=rng.choice(versions), headers=standard())
        if rng.random() < 0.2:
            request = request.replace(b"\r\n", b"\n", rng.choice([1, -1]))
        if rng.random() < 0.1:
            request = request.replace(b"GET ", b"GET  ", 1)
        got = fed(request)
        if got is None:
            continue
        head, parser = got
        expected = parser.get_http_version() == "1.1"
        assert head.http11(request, parser) is expected, request
        parsed[expected] += 1
    assert parsed[True] > 50 and parsed[False] > 20  # both answers came often


def test_header_values_lose_trailing_blanks_as_uvicorn_strips_them() -> None:
    request = b"GET /ws HTTP/1.1\r\nHost: h\r\nX-A: v \t\r\nX-B: w\r\nX-C:\r\nX-D: \tx\t \r\n\r\n"
    got = fed(request)
    assert got is not None
    assert got[0].headers == [
        (b"host", b"h"),
        (b"x-a", b"v"),
        (b"x-b", b"w"),
        (b"x-c", b""),
        (b"x-d", b"x"),
    ]


def test_the_key_noted_as_headers_come_is_uvicorns_and_websockets_answer() -> None:
    """``Head.websocket_key`` (what a head's callbacks noted) against what uvicorn and
    websockets make of its header list: uvicorn's ``_get_upgrade`` is ``websocket`` and
    ``handover.websocket_key`` finds the key. Random heads: headers dropped, mangled,
    recased, repeated, Connection lists, values past websockets' line limit, too many."""
    rng = random.Random(20261204)
    keys = 0
    for n in range(3000):
        fields = standard()
        for _ in range(rng.choice([0, 0, 1, 2, 3])):
            change_one(fields, rng, ["drop", "mangle", "case", "repeat"])
        if rng.random() < 0.2:
            listed = rng.choice(["keep-alive, Upgrade", "close", "x,upgrade "])
            fields.append(("Connection", listed))
        if rng.random() < 0.05:
            fields.append(("X-Long", "v" * rng.choice([8180, 8188, 8200])))
        if rng.random() < 0.05:
            fields += [(f"X-{i}", "1") for i in range(rng.choice([120, 124, 130]))]
        rng.shuffle(fields)
        target = "/ws?token=" + "t" * rng.choice([10, 8170, 8180])
        got = fed(upgrade(target, headers=fields))
        if got is None:
            continue
        head = got[0]
        stand_in = types.SimpleNamespace(headers=head.headers)
        upgrade_to = HttpToolsProtocol._get_upgrade(stand_in)  # type: ignore[arg-type]
        expected = websocket_key(head.url, head.headers) if upgrade_to == b"websocket" else None
        assert head.websocket_key() == expected, (n, fields)
        keys += expected is not None
    assert 300 < keys < 2900  # both answers came often


def test_header_names_are_kept_lower_case_past_what_is_remembered_of_them() -> None:
    """``Head`` remembers how clients write header names (a bounded number, short ones
    only): every name is kept as ``lower()`` gives it and noted by its lower-case form,
    for more distinct names than are remembered, long ones and every casing of the
    handshake's own."""
    rng = random.Random(20261205)
    noted = ["Connection", "Upgrade", "Sec-WebSocket-Key", "Sec-WebSocket-Version"]
    for n in range(3000):
        head = Head()
        names = [
            "".join(rng.choice("aBcD-xYz") for _ in range(rng.choice([1, 5, 20, 70, 200])))
            for _ in range(rng.randint(1, 4))
        ]
        names += ["".join(rng.choice([c.lower(), c.upper()]) for c in rng.choice(noted))]
        for name in names:
            head.on_header(name.encode(), b"v%d" % n)
        assert [name for name, _ in head.headers] == [name.lower().encode() for name in names]
        counted = head.upgrades + head.keys + head.versions + (head.connection is not None)
        assert counted == 1, names
