"""A request head that does not come in time: 408 and the connection closed
(``gateway.server.headwait``), where stock uvicorn waits for good.

Slowloris and silent clients hold a file descriptor and a connection slot each; the
gateway's HTTP protocol gives every connection ``GATEWAY_REQUEST_HEAD_TIMEOUT`` to send
a whole request head, and once more after each response for the next request.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from tests.conftest import MakeServer, RunningServer, eventually, token
from tests.test_handshake import standard, upgrade

HEAD_TIMEOUT = 0.5
# The deadline, the sweep's second, and room for a slow machine.
WITHIN = HEAD_TIMEOUT + 1.0 + 5.0

pytestmark = pytest.mark.gateway_protocols


async def connect(server: RunningServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", server.port)


async def ended_with(reader: asyncio.StreamReader) -> bytes:
    """Everything the server writes until it closes the connection."""
    return await asyncio.wait_for(reader.read(), WITHIN)


def http_connections(server: RunningServer) -> int:
    return len(server.server.server_state.connections)


async def test_a_silent_client_gets_a_408_and_is_closed(make_server: MakeServer) -> None:
    server = await make_server(request_head_timeout=HEAD_TIMEOUT)
    reader, writer = await connect(server)
    await eventually(lambda: http_connections(server) == 1)
    answer = await ended_with(reader)
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert b"connection: close\r\n" in answer and answer.endswith(b"\r\n\r\nRequest Timeout")
    await eventually(lambda: http_connections(server) == 0)  # no slot left behind
    writer.close()


async def test_a_request_a_byte_at_a_time_is_cut_off(make_server: MakeServer) -> None:
    """Slowloris: the bytes keep coming, the deadline does not move."""
    server = await make_server(request_head_timeout=HEAD_TIMEOUT)
    reader, writer = await connect(server)
    request = upgrade(headers=standard())
    sent = 0

    async def trickle() -> None:
        nonlocal sent
        for byte in request[:-2]:  # never the last line's end
            writer.write(bytes([byte]))
            sent += 1
            await asyncio.sleep(0.05)

    trickling = asyncio.create_task(trickle())
    try:
        answer = await ended_with(reader)
    finally:
        trickling.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await trickling
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert sent < len(request) - 2  # cut off while still sending
    await eventually(lambda: http_connections(server) == 0)
    writer.close()


async def test_a_head_in_time_is_served_and_its_connection_kept(make_server: MakeServer) -> None:
    """A slow head that completes in time: the upgrade is answered and the WebSocket
    lives past the deadline (its wait ended with the head)."""
    server = await make_server(request_head_timeout=HEAD_TIMEOUT)
    reader, writer = await connect(server)
    request = upgrade(headers=standard())
    for part in (request[:20], request[20:60], request[60:]):
        writer.write(part)
        await asyncio.sleep(HEAD_TIMEOUT / 5)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WITHIN)
    assert head.startswith(b"HTTP/1.1 101")
    with pytest.raises(TimeoutError):  # nothing comes, nothing closes: no 408 later
        await asyncio.wait_for(reader.read(1), HEAD_TIMEOUT + 2.0)
    assert server.gateway.connections.open["websocket"] == 1
    writer.close()


async def test_the_next_request_on_a_kept_alive_connection_has_its_own_deadline(
    make_server: MakeServer,
) -> None:
    server = await make_server(request_head_timeout=HEAD_TIMEOUT)
    reader, writer = await connect(server)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WITHIN)
    assert first.startswith(b"HTTP/1.1 200")
    writer.write(b"GET /healthz HTTP/1.1\r\nHo")  # and no more
    rest = await ended_with(reader)
    assert b"HTTP/1.1 408 Request Timeout\r\n" in rest
    writer.close()


async def test_an_open_sse_stream_is_not_timed_out(make_server: MakeServer) -> None:
    server = await make_server(request_head_timeout=HEAD_TIMEOUT)
    reader, writer = await connect(server)
    writer.write(f"GET /sse?channel=news&token={token()} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WITHIN)
    assert head.startswith(b"HTTP/1.1 200")
    await asyncio.wait_for(reader.readuntil(b"\n\n\r\n"), WITHIN)  # the opening
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.read(1), HEAD_TIMEOUT + 2.0)
    assert server.gateway.connections.open["sse"] == 1
    writer.close()


async def test_stock_uvicorn_waits_for_a_silent_client(make_server: MakeServer) -> None:
    """The comparison: uvicorn's own protocol (``GATEWAY_RAW_WRITES=false``) keeps the
    silent connection open, which is what the deadline is for."""
    server = await make_server(request_head_timeout=HEAD_TIMEOUT, raw_writes=False)
    reader, writer = await connect(server)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.read(1), HEAD_TIMEOUT + 2.0)
    assert http_connections(server) == 1
    writer.close()
