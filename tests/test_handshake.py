"""WebSocket handshakes answered by the gateway's HTTP protocol, below ASGI.

An upgrade to ``/ws`` that websockets would accept as it is gets its 101 from
``GatewayHttpToolsProtocol`` itself; anything else takes uvicorn's own path. These tests
send requests over raw sockets and hold every answer against stock uvicorn's
(``GATEWAY_RAW_WRITES=false``, same app): the 101 byte for byte but the date, and for a
table of malformed and a run of randomised requests the same status line, then a closed
connection or a working one alike. No request crashes a server or leaves a connection
counted.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import random
import re
import socket

import orjson
import pytest

from tests.conftest import MakeServer, RunningServer, eventually, token
from tests.helpers import client_text_frame, read_raw_frame

DATE = re.compile(rb"(?im)^date: [^\r\n]*\r\n")
TIMEOUT = 5.0

pytestmark = pytest.mark.gateway_protocols  # the fast path is the gateway protocols'


def key() -> str:
    return base64.b64encode(os.urandom(16)).decode()


def upgrade(
    target: str | None = None,
    *,
    method: str = "GET",
    version: str = "HTTP/1.1",
    headers: list[tuple[str, str]] | None = None,
) -> bytes:
    target = target if target is not None else f"/ws?token={token()}"
    lines = [f"{method} {target} {version}", "Host: 127.0.0.1"]
    lines += [f"{name}: {value}" for name, value in headers or []]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def standard(**override: str | None) -> list[tuple[str, str]]:
    fields: dict[str, str | None] = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": key(),
        "Sec-WebSocket-Version": "13",
    }
    fields.update(override)
    return [(name, value) for name, value in fields.items() if value is not None]


async def answer(port: int, *pieces: bytes) -> tuple[bytes, bool]:
    """The response head (up to the blank line, or what came before EOF), and whether the
    server then closed the connection. The request is sent as ``pieces``, each its own
    segment (paced, so that the server reads them apart)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        for n, piece in enumerate(pieces):
            if n:
                await writer.drain()
                await asyncio.sleep(0.005)
            writer.write(piece)
        head = b""
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        try:
            rest = await asyncio.wait_for(reader.read(65536), 0.5)
            closed = rest == b"" or not head.startswith(b"HTTP/1.1 101")
        except TimeoutError:
            closed = False
        except ConnectionError:
            closed = True
        return head, closed
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def change_one(fields: list[tuple[str, str]], rng: random.Random, changes: list[str]) -> None:
    """One of ``fields`` changed in place by one of ``changes``: dropped, its value
    shuffled, its case swapped, or repeated."""
    i = rng.randrange(len(fields))
    name, value = fields[i]
    change = rng.choice(changes)
    if change == "drop":
        del fields[i]
    elif change == "mangle":
        fields[i] = (name, "".join(rng.sample(value, len(value))) or "x")
    elif change == "case":
        fields[i] = (name.upper(), value.swapcase())
    else:
        fields.append((name, value))


async def upgrade_then_ping(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A standard upgrade on an open connection: its 101, then a ping answered ok."""
    writer.write(upgrade(headers=standard()))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    assert status(head) == b"HTTP/1.1 101 Switching Protocols"
    writer.write(client_text_frame(b'{"id": 1, "op": "ping"}'))
    assert orjson.loads((await read_raw_frame(reader))[2:])["ok"] is True


def status(head: bytes) -> bytes:
    return head.split(b"\r\n", 1)[0]


async def test_the_101_is_the_one_stock_uvicorn_writes(
    stock_pair: tuple[RunningServer, RunningServer],
) -> None:
    fixed = standard(**{"Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
    heads = [(await answer(s.port, upgrade(headers=fixed)))[0] for s in stock_pair]
    assert heads[0].startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in heads[0]
    assert DATE.sub(b"", heads[0]) == DATE.sub(b"", heads[1])


async def test_a_connection_opened_below_asgi_works_and_counts(server: RunningServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(upgrade(headers=standard()))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        assert status(head) == b"HTTP/1.1 101 Switching Protocols"
        await eventually(lambda: server.gateway.connections.open["websocket"] == 1)
        writer.write(client_text_frame(b'{"id": 1, "op": "ping"}'))
        reply = orjson.loads((await read_raw_frame(reader))[2:])
        assert reply == {"id": 1, "ok": True, "result": {}}
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    await eventually(lambda: server.gateway.connections.open["websocket"] == 0)


MALFORMED = {
    "no key": upgrade(headers=standard(**{"Sec-WebSocket-Key": None})),
    "key not base64": upgrade(headers=standard(**{"Sec-WebSocket-Key": "not base64!!"})),
    "key of 15 bytes": upgrade(
        headers=standard(**{"Sec-WebSocket-Key": base64.b64encode(b"x" * 15).decode()})
    ),
    "two keys": upgrade(headers=[*standard(), ("Sec-WebSocket-Key", key())]),
    "version 12": upgrade(headers=standard(**{"Sec-WebSocket-Version": "12"})),
    "no version": upgrade(headers=standard(**{"Sec-WebSocket-Version": None})),
    "upgrade to something else": upgrade(headers=standard(Upgrade="h2c")),
    "no connection upgrade": upgrade(headers=standard(Connection="keep-alive")),
    "HTTP/1.0": upgrade(version="HTTP/1.0", headers=standard()),
    # (The front door reads HTTP/1.1 from the request line when the line is plain, and
    # asks the parser otherwise: ``Head.http11``.)
    "HTTP/2.0": upgrade(version="HTTP/2.0", headers=standard()),
    "HTTP/1.1 in lines ended by LF alone": upgrade(headers=standard()).replace(b"\r\n", b"\n"),
    "request line ended by LF alone": upgrade(headers=standard()).replace(b"\r\n", b"\n", 1),
    "two spaces before the version": upgrade(version=" HTTP/1.1", headers=standard()),
    "a target naming a version": upgrade(
        f"/ws?token={token()}&v=HTTP/1.0", version="HTTP/1.0", headers=standard()
    ),
    "POST": upgrade(method="POST", headers=standard()),
    "a path with no WebSocket": upgrade("/api/publish", headers=standard()),
    "unknown path": upgrade("/nowhere", headers=standard()),
    "query not UTF-8": upgrade("/ws?token=%ff%fe", headers=standard()),
    "bad token": upgrade("/ws?token=nope", headers=standard()),
    "header line too long": upgrade(headers=[*standard(), ("X-Big", "y" * 70_000)]),
    "too many headers": upgrade(headers=[*standard(), *[(f"X-{n}", "1") for n in range(300)]]),
    "not HTTP": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64) + b"\r\n\r\n",
}


@pytest.mark.parametrize("name", list(MALFORMED))
async def test_a_malformed_upgrade_gets_what_stock_uvicorn_answers(
    stock_pair: tuple[RunningServer, RunningServer], name: str
) -> None:
    request = MALFORMED[name]
    (fast_head, fast_closed), (stock_head, stock_closed) = [
        await answer(s.port, request) for s in stock_pair
    ]
    assert status(fast_head) == status(stock_head), (name, fast_head, stock_head)
    assert fast_closed == stock_closed, name
    for server in stock_pair:  # nothing left behind: no session, no connection counted
        await eventually(lambda s=server: s.gateway.connections.total == 0)  # type: ignore[misc]


async def test_randomised_upgrades_get_what_stock_uvicorn_answers(
    stock_pair: tuple[RunningServer, RunningServer],
) -> None:
    rng = random.Random(19)
    for _ in range(60):
        fields = standard()
        if rng.random() < 0.5:
            change_one(fields, rng, ["drop", "mangle", "case", "duplicate"])
        target = rng.choice(["/ws", "/ws?token=" + token(), "/w%73?token=" + token(), "/x"])
        request = upgrade(target, headers=fields)
        (fast_head, fast_closed), (stock_head, stock_closed) = [
            await answer(s.port, request) for s in stock_pair
        ]
        assert status(fast_head) == status(stock_head), (request, fast_head, stock_head)
        assert fast_closed == stock_closed, request
    for server in stock_pair:
        await eventually(lambda s=server: s.gateway.connections.total == 0)  # type: ignore[misc]


async def test_under_h11_the_websocket_protocol_answers_ws_below_asgi(
    make_server: MakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the gateway's HTTP protocol (no httptools), the WebSocket protocol parses
    the upgrade and answers it itself: still no ASGI call, same contract."""
    from gateway.server.websocket import GatewayWebSocketProtocol

    calls: list[object] = []
    original = GatewayWebSocketProtocol.run_asgi

    async def counted(self: GatewayWebSocketProtocol) -> None:
        calls.append(self)
        await original(self)

    monkeypatch.setattr(GatewayWebSocketProtocol, "run_asgi", counted)
    server = await make_server(uvicorn_options={"http": "h11"})
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        await upgrade_then_ping(reader, writer)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    refused, closed = await answer(server.port, upgrade("/ws?token=nope", headers=standard()))
    assert status(refused) == b"HTTP/1.1 101 Switching Protocols" and not closed
    assert calls == []


def test_the_token_is_read_from_the_query_as_the_framework_reads_it() -> None:
    """The handshakes below ASGI read the query with ``query_params`` (``token``,
    ``channel``, ``last_event_id``); the endpoints of the framework path with starlette's
    ``QueryParams``: the same values for any query."""
    from starlette.datastructures import QueryParams

    from gateway.query import query_params, query_value

    pieces = ["token", "t%6Fken", "tok", "=", "==", "&", "&&", "+", "%", "%2", "%3D", "%26"]
    pieces += ["a", "é", "%C3%A9", "%FF", " ", ";", "x=y", "token=", "token=z"]
    rng = random.Random(19)
    for _ in range(20_000):
        raw = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 9))).encode()
        framework = QueryParams(raw.decode("latin-1"))
        assert query_value(raw, "token") == framework.get("token"), raw
        assert query_params(raw) == {key: framework.getlist(key) for key in framework}, raw
