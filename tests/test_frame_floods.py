"""Frames that cost a client nothing to send and the server something to keep: pings
from a client that never reads the pongs, and empty continuation frames without end.
The gateway's WebSocket protocol (``UpgradedWebSocket``) keeps neither: no pong while the
client does not read (RFC 6455 5.5.3 lets one go unsent), no entry per empty fragment.
Each test floods one connection over a raw socket, waits until the server has read all
of it, holds the server's state against a bound, and then shows the connection still
answers."""

from __future__ import annotations

import asyncio
import fcntl
import termios
from typing import Any

import pytest

from tests.conftest import MakeServer, RunningServer, eventually
from tests.test_frames import CONT, PING, TEXT, frame, server_frame
from tests.test_handshake import TIMEOUT, standard, status, upgrade

pytestmark = pytest.mark.gateway_protocols


async def connected(server: RunningServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(upgrade(headers=standard()))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    assert status(head) == b"HTTP/1.1 101 Switching Protocols"
    return reader, writer


def upgraded(server: RunningServer) -> Any:
    [protocol] = [c for c in server.server.server_state.connections if hasattr(c, "close_sent")]
    return protocol


def unread(protocol: Any) -> int:
    """Bytes the kernel holds for the server that it has not read yet."""
    queued = bytearray(4)
    fcntl.ioctl(protocol.transport.get_extra_info("socket").fileno(), termios.FIONREAD, queued)
    return int.from_bytes(queued, "little")


async def sent(writer: asyncio.StreamWriter, data: bytes, times: int) -> None:
    for _ in range(times):
        writer.write(data)
        await writer.drain()


async def reply_to(reader: asyncio.StreamReader, cmd_id: int) -> bytes:
    """Read frames (pongs included) until the reply to ``cmd_id``."""
    needle = b'"id":%d' % cmd_id
    while True:
        opcode, payload = await server_frame(reader)
        if opcode == TEXT and needle in payload:
            return payload


async def test_a_client_that_floods_pings_and_reads_nothing_gets_no_pongs_queued(
    make_server: MakeServer,
) -> None:
    server = await make_server(raw_writes=True)
    reader, writer = await connected(server)
    protocol = upgraded(server)
    await sent(writer, frame(PING, b"p" * 125) * 1000, 240)  # 31 MB of pings
    await eventually(lambda: unread(protocol) == 0, timeout=30)
    # What the kernel could not take waits in the transport: at most its high-water mark
    # and one read's pongs, not the 31 MB answered to a client that reads nothing.
    assert protocol.transport.get_write_buffer_size() < 1 << 20
    writer.write(frame(TEXT, b'{"id": 5, "op": "ping"}'))
    assert await reply_to(reader, 5) == b'{"id":5,"ok":true,"result":{}}'
    writer.close()


async def test_empty_continuation_frames_without_end_are_not_kept(
    make_server: MakeServer,
) -> None:
    server = await make_server(raw_writes=True)
    reader, writer = await connected(server)
    protocol = upgraded(server)
    writer.write(frame(TEXT, b'{"id": 6, "op": ', fin=False))
    await sent(writer, frame(CONT, fin=False) * 100_000, 10)  # a million empty ones, 6 MB
    await eventually(lambda: unread(protocol) == 0, timeout=30)
    assert len(protocol._fragments) == 1
    writer.write(frame(CONT, b'"ping"}'))
    assert await reply_to(reader, 6) == b'{"id":6,"ok":true,"result":{}}'
    writer.close()
