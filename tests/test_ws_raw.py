"""Raw frame writes: the gateway's uvicorn protocol hands pushes straight to the socket.

The frames must be byte-for-byte what websockets itself would send, the fast path
must really be taken under the gateway's server (a silent fallback to ASGI would
pass every other test), and under a plain uvicorn protocol the ASGI path must
still deliver the same frames.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
import uvicorn
from websockets.frames import Frame, Opcode

from gateway.app import create_app
from gateway.settings import Settings
from gateway.ws import WebSocketTransport
from gateway.wsprotocol import GatewayWebSocketProtocol, text_frame
from tests.conftest import SECRET, RunningServer, eventually, free_port, token, uvicorn_config
from tests.helpers import api_client, api_publish, ws_client


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_text_frame_is_what_websockets_serializes(size: int) -> None:
    payload = b"x" * size
    assert text_frame(payload) == Frame(Opcode.TEXT, payload).serialize(mask=False)


def _transports(server: RunningServer) -> list[WebSocketTransport]:
    hub = server.gateway.hub
    return [
        session._transport
        for lc in hub._channels.values()
        for session in lc.live
        if session.transport_name == "websocket"
    ]


async def _handshake(port: int, tok: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            f"GET /ws?token={tok} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


def _client_text(payload: bytes) -> bytes:
    """A masked client text frame."""
    return Frame(Opcode.TEXT, payload).serialize(mask=True)


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    """One whole server frame, header included, exactly as it was on the wire."""
    head = await asyncio.wait_for(reader.readexactly(2), 5)
    assert head[1] & 0x80 == 0, "server frames are never masked"
    size = head[1] & 0x7F
    extra = b""
    if size == 126:
        extra = await reader.readexactly(2)
        size = int.from_bytes(extra, "big")
    elif size == 127:
        extra = await reader.readexactly(8)
        size = int.from_bytes(extra, "big")
    return head + extra + await asyncio.wait_for(reader.readexactly(size), 5)


async def test_publications_reach_the_socket_as_raw_frames(
    make_server: Callable[..., Awaitable[RunningServer]],
) -> None:
    server = await make_server(max_message_bytes=200_000)
    reader, writer = await _handshake(server.port, token())
    try:
        writer.write(_client_text(b'{"id": 1, "op": "subscribe", "channel": "raw"}'))
        reply = orjson.loads((await _read_frame(reader))[2:])
        assert reply["ok"] is True, reply
        [transport] = await eventually(lambda: _transports(server))
        assert isinstance(transport._raw, GatewayWebSocketProtocol)

        async with api_client(server) as http:
            sizes = [1, 200, 70_000]  # 7-bit, 16-bit and 64-bit length headers
            for n in sizes:
                await api_publish(http, "raw", {"pad": "p" * n})
        for offset, n in enumerate(sizes, start=1):
            frame = await _read_frame(reader)
            expected = orjson.dumps(
                {"channel": "raw", "offset": offset, "epoch": reply["result"]["epoch"],
                 "data": {"pad": "p" * n}}
            )  # fmt: skip
            assert frame == text_frame(expected)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_one_frame_shared_by_all_subscribers(server: RunningServer) -> None:
    async with ws_client(server) as a, ws_client(server) as b:
        await a.subscribe("shared")
        await b.subscribe("shared")
        seen: list[Any] = []
        hub = server.gateway.hub
        original = hub._deliver

        def spy(lc: Any, message: Any) -> None:
            original(lc, message)
            seen.append(message)

        hub._deliver = spy
        try:
            async with api_client(server) as http:
                await api_publish(http, "shared", {"n": 1})
            [pa] = await a.publications("shared", 1)
            [pb] = await b.publications("shared", 1)
        finally:
            hub._deliver = original
        assert pa == pb
        [publication] = seen
        # Built once, on the publication, for both subscribers.
        assert publication.ws == text_frame(orjson.dumps(pa))


async def test_raw_writes_off_sends_through_asgi(
    make_server: Callable[..., Awaitable[RunningServer]],
) -> None:
    server = await make_server(raw_writes=False)  # GATEWAY_RAW_WRITES=false
    async with ws_client(server) as client, api_client(server) as http:
        await client.subscribe("asgi")
        [transport] = await eventually(lambda: _transports(server))
        assert transport._raw is None
        for n in range(5):
            await api_publish(http, "asgi", {"n": n})
        got = await client.publications("asgi", 5)
        assert [p["offset"] for p in got] == [1, 2, 3, 4, 5]


@contextlib.asynccontextmanager
async def _plain_uvicorn_server() -> AsyncIterator[RunningServer]:
    """The gateway under uvicorn's own websockets-sansio protocol: no raw frames."""
    settings = Settings(jwt_secret=SECRET, demo=False)
    app = create_app(settings)
    port = free_port()
    config = uvicorn_config(app, settings, port, log_config=None, ws="websockets-sansio")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    deadline = time.monotonic() + 10
    while not server.started:
        assert not task.done(), "server exited during start-up"
        assert time.monotonic() < deadline, "server did not start"
        await asyncio.sleep(0.01)
    try:
        yield RunningServer(
            url=f"http://127.0.0.1:{port}",
            ws_url=f"ws://127.0.0.1:{port}",
            port=port,
            app=app,
            settings=settings,
            server=server,
        )
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


async def test_other_servers_get_the_asgi_path() -> None:
    async with (
        _plain_uvicorn_server() as server,
        ws_client(server) as client,
        api_client(server) as http,
    ):
        await client.subscribe("plain")
        [transport] = await eventually(lambda: _transports(server))
        assert transport._raw is None
        for n in range(20):
            await api_publish(http, "plain", {"n": n})
        got = await client.publications("plain", 20)
        assert [p["data"]["n"] for p in got] == list(range(20))
        assert [p["offset"] for p in got] == list(range(1, 21))
