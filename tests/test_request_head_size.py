"""A request head too large: 431 and the connection closed (``gateway.server.http``,
``MAX_HEAD``), where httptools sets no limit and uvicorn's protocol kept a target or a
header of any size whole (an endless one grew a worker by 150 MB a connection until the
head's deadline). Bodies are not heads: a large publish and a long NDJSON stream pass."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from gateway.server.http import MAX_HEAD
from tests.conftest import MakeServer, RunningServer, eventually
from tests.helpers import api_client, api_history, bearer
from tests.test_handshake import standard, upgrade

pytestmark = pytest.mark.gateway_protocols

TOO_LARGE = b"HTTP/1.1 431 Request Header Fields Too Large\r\n"


async def answer_to(server: RunningServer, head: bytes, more: int = 0) -> bytes:
    """Send ``head`` (then ``more`` bytes of one endless header, in 64 KiB pieces, for as
    long as the server reads), and read everything the server writes until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(head)
        with contextlib.suppress(ConnectionError):
            for _ in range(more >> 16):
                writer.write(b"x" * 65_536)
                await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


def http_connections(server: RunningServer) -> int:
    return len(server.server.server_state.connections)


@pytest.mark.parametrize(
    ("name", "head", "more"),
    [
        ("a long target", b"GET /healthz?x=" + b"y" * (2 * MAX_HEAD) + b" HTTP/1.1\r\n\r\n", 0),
        (
            "a long header",
            b"GET /healthz HTTP/1.1\r\nx-big: " + b"y" * (2 * MAX_HEAD) + b"\r\n\r\n",
            0,
        ),
        ("an endless header", b"GET /healthz HTTP/1.1\r\nx-big: ", 64 * MAX_HEAD),
        (
            "an upgrade's endless header",
            upgrade(headers=standard())[:-2] + b"x-big: ",
            64 * MAX_HEAD,
        ),
        ("many headers", b"GET /healthz HTTP/1.1\r\n" + b"x-h: 1\r\n" * MAX_HEAD + b"\r\n", 0),
    ],
)
async def test_a_head_over_the_limit_is_431_and_closed(
    make_server: MakeServer, name: str, head: bytes, more: int
) -> None:
    server = await make_server()
    answer = await answer_to(server, head, more)
    assert answer.startswith(TOO_LARGE), (name, answer[:80])
    assert b"connection: close\r\n" in answer
    await eventually(lambda: http_connections(server) == 0)


async def test_a_head_near_the_limit_and_large_bodies_are_served(make_server: MakeServer) -> None:
    server = await make_server()
    near = b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: " + b"y" * (MAX_HEAD - 200)
    answer = await answer_to(server, near + b"\r\nconnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer[:80]
    async with api_client(server) as http:
        body = {"channel": "big", "data": "z" * 60_000}  # a body larger than the head limit
        assert (await http.post("/api/publish", json=body, headers=bearer())).status_code == 200
        lines = b"".join(b'"%s"\n' % (b"w" * 1000) for _ in range(300))  # 300 KB streamed
        r = await http.post("/api/publish/stream?channel=big", content=lines, headers=bearer())
        assert r.status_code == 200 and r.json()["published"] == 300, r.text
        assert len((await api_history(http, "big", limit=1000))["publications"]) == 100


@pytest.mark.parametrize(
    ("path", "size", "status"),
    [
        ("/api/publish", 65_536, 200),  # the message limit
        ("/api/publish", 65_537, 413),
        ("/api/publish/stream?channel=one", None, 200),  # 100 lines, 100 KB
    ],
)
async def test_a_body_sent_with_its_head_in_one_write_is_no_head(
    make_server: MakeServer, path: str, size: int | None, status: int
) -> None:
    """Regression: every byte read while the head was awaited counted against it, the
    body's too when it came in the same read as the head, so a 65,536-byte publish (the
    message limit) or a 100 KB NDJSON stream sent in one write was refused 431."""
    server = await make_server()
    if size is not None:
        frame = b'{"channel": "one", "data": ""}'
        body = frame[:-2] + b"z" * (size - len(frame)) + frame[-2:]
        assert len(body) == size
    else:
        body = b"".join(b'"%s"\n' % (b"w" * 1000) for _ in range(100))
    head = (
        f"POST {path} HTTP/1.1\r\nhost: x\r\nauthorization: {bearer()['Authorization']}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    ).encode()
    answer = await answer_to(server, head + body)
    assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:200]
    if size is None:
        assert b'"published":100' in answer, answer[-200:]
