"""The load generator's kernel-stamped reads (loadtest/clients/stamped.py) on real sockets."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from loadtest.clients.stamped import _ANCILLARY, StampedTransport, stamp_arrivals


class Collecting(asyncio.Protocol):
    """Keeps what it is fed, with the transport's stamp at each feed."""

    def __init__(self) -> None:
        self.transport: Any = None
        self.data = bytearray()
        self.stamps: list[float] = []
        self.eof = asyncio.Event()
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.data += data
        self.stamps.append(self.transport.arrived)

    def eof_received(self) -> bool | None:
        self.eof.set()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set_result(exc)


class CollectingBuffered(Collecting, asyncio.BufferedProtocol):
    """The same through ``get_buffer``/``buffer_updated`` (as picows' protocol reads)."""

    def __init__(self) -> None:
        Collecting.__init__(self)
        self.buffer = bytearray(16)  # small: a read takes at most this much

    def get_buffer(self, sizehint: int) -> bytearray:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(bytes(self.buffer[:nbytes]))


def pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.socket()
        stamp_arrivals(client)
        client.connect(server.getsockname())
        peer, _ = server.accept()
    client.setblocking(False)
    return client, peer


@pytest.fixture(scope="module", autouse=True)
def stamping_on() -> Iterator[None]:
    """The kernel turns its receive stamps on for the first socket that asks a moment
    later (deferred work): until then packets arrive unstamped. Wait until one is
    stamped, and keep that socket open meanwhile so they stay on."""
    client, peer = pair()
    client.setblocking(True)
    deadline = time.monotonic() + 5
    with client, peer:
        while True:
            peer.sendall(b"x")
            _, ancillary, _, _ = client.recvmsg(16, _ANCILLARY)
            if ancillary:
                break
            assert time.monotonic() < deadline, "the kernel never stamped a packet"
            time.sleep(0.01)  # the kernel's deferred work runs meanwhile
        yield


async def until(condition: Any, deadline: float = 5.0) -> None:
    end = time.monotonic() + deadline
    while not condition():
        assert time.monotonic() < end, "timed out"
        await asyncio.sleep(0.001)


@pytest.mark.parametrize("kind", [Collecting, CollectingBuffered])
async def test_a_read_carries_the_time_its_data_arrived_not_when_it_was_read(kind: Any) -> None:
    client, peer = pair()
    with peer:
        before = time.time()
        peer.sendall(b"first")
        # The data waits in the kernel; reading starts only now, well after it arrived.
        while time.time() - before < 0.05:
            pass
        reading_from = time.time()
        protocol = kind()
        transport = StampedTransport(asyncio.get_running_loop(), client, protocol)
        await until(lambda: bytes(protocol.data) == b"first")
        assert before <= protocol.stamps[0] < reading_from
        sent = time.time()
        peer.sendall(b"second")
        await until(lambda: bytes(protocol.data) == b"firstsecond")
        assert all(sent <= stamp <= time.time() for stamp in protocol.stamps[1:])
        assert transport.get_extra_info("peername") == peer.getsockname()
        peer.shutdown(socket.SHUT_WR)  # the peer's end of stream
        await asyncio.wait_for(protocol.eof.wait(), 5)
        assert await asyncio.wait_for(protocol.lost, 5) is None
    assert transport.is_closing() and client.fileno() == -1


async def test_data_that_arrived_unstamped_is_given_the_time_it_was_read() -> None:
    # A Unix stream socket: the kernel stamps nothing on it.
    client, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    client.setblocking(False)
    with peer:
        peer.sendall(b"early")
        reading_from = time.time()
        protocol = Collecting()
        transport = StampedTransport(asyncio.get_running_loop(), client, protocol)
        await until(lambda: bytes(protocol.data) == b"early")
        assert reading_from <= protocol.stamps[0] <= time.time()
        transport.close()
        assert await asyncio.wait_for(protocol.lost, 5) is None


async def test_writes_the_socket_cannot_take_at_once_go_out_later_in_order() -> None:
    client, peer = pair()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    protocol = Collecting()
    transport = StampedTransport(asyncio.get_running_loop(), client, protocol)
    chunks = [bytes([i]) * 100_000 for i in range(1, 11)]
    for chunk in chunks:
        transport.write(chunk)
    assert transport.get_write_buffer_size() > 0  # more than the socket took at once
    transport.close()  # after what is pending is sent
    peer.setblocking(False)
    loop = asyncio.get_running_loop()
    received = bytearray()
    with peer:
        while True:
            data = await asyncio.wait_for(loop.sock_recv(peer, 65536), 5)
            if not data:
                break
            received += data
    assert bytes(received) == b"".join(chunks)
    assert await asyncio.wait_for(protocol.lost, 5) is None


async def test_a_reset_connection_is_lost_with_its_error() -> None:
    client, peer = pair()
    protocol = Collecting()
    StampedTransport(asyncio.get_running_loop(), client, protocol)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    peer.close()  # linger 0: a reset
    exc = await asyncio.wait_for(protocol.lost, 5)
    assert isinstance(exc, ConnectionResetError)
