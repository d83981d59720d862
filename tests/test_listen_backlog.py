"""The listen queue (``GATEWAY_LISTEN_BACKLOG``): what the kernel holds for a worker that
has not accepted yet, as when every client of a pod reconnects at once.

A queue that is full drops the next SYN, and that client's kernel tries again a second
later (then 3 s, 7 s): uvicorn's default of 2048 did so in a reconnect storm of 5,000
clients. Here a real ``python -m gateway`` is stopped (SIGSTOP) so that it accepts
nothing: exactly ``backlog + 1`` connections complete (Linux counts the queue full past
its limit), the next one does not, even across its SYN's first retry, and once the
process runs again every one of them, the late one included, is served.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import socket
import time
from collections.abc import AsyncIterator

import httpx
import pytest
import uvicorn

from gateway.server.options import uvicorn_options
from gateway.settings import Settings
from tests.conftest import SECRET
from tests.procs import GatewayProcess

BACKLOG = 3


def test_the_backlog_reaches_uvicorns_config_for_one_worker_or_several() -> None:
    """Both entry points build their ``uvicorn.Config`` from these options: one worker's
    server listens with ``config.backlog``, several workers' parent binds with it."""
    default = uvicorn.Config("gateway.app:create_app", **uvicorn_options(Settings()))
    assert default.backlog == 65535  # the kernel caps it at net.core.somaxconn
    chosen = uvicorn.Config(
        "gateway.app:create_app", **uvicorn_options(Settings(listen_backlog=BACKLOG))
    )
    assert chosen.backlog == BACKLOG
    with pytest.raises(ValueError):
        Settings(listen_backlog=0)


@pytest.fixture
async def stopped() -> AsyncIterator[GatewayProcess]:
    """A gateway listening with ``BACKLOG``, then stopped: it accepts nothing."""
    proc = GatewayProcess(
        env={"GATEWAY_JWT_SECRET": SECRET, "GATEWAY_LISTEN_BACKLOG": str(BACKLOG)}
    )
    try:
        await proc.wait_ready()
        os.kill(proc.proc.pid, signal.SIGSTOP)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.proc.pid, signal.SIGCONT)
        proc.stop()


def _connecting(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    assert sock.connect_ex(("127.0.0.1", port)) in (0, 115)  # EINPROGRESS
    return sock


def _connected(sock: socket.socket, within: float) -> bool:
    """Whether the handshake completes within ``within`` s (the socket turns writable)."""
    deadline = time.monotonic() + within
    while (left := deadline - time.monotonic()) > 0:
        _, writable, _ = select.select([], [sock], [], left)
        if writable:
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
            return True
    return False


async def test_a_stopped_worker_has_the_queue_it_was_given_and_serves_it_after(
    stopped: GatewayProcess,
) -> None:
    held: list[socket.socket] = []
    try:
        for _ in range(BACKLOG + 1):  # one at a time: each in the queue before the next SYN
            held.append(_connecting(stopped.port))
            assert _connected(held[-1], 5.0), f"connection {len(held)} was not queued"
        late = _connecting(stopped.port)
        held.append(late)
        # Its SYN is dropped, and so is the retry a second later: the queue is full.
        assert not _connected(late, 1.5)
        os.kill(stopped.proc.pid, signal.SIGCONT)
        # The worker runs again: the queued connections are accepted and served, and the
        # late one gets in on its SYN's next retry.
        assert await asyncio.to_thread(_connected, late, 10.0)
        for sock in held:
            sock.setblocking(True)
            sock.settimeout(10)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            assert sock.recv(64).startswith(b"HTTP/1.1 200 ")
        async with httpx.AsyncClient() as client:
            assert (await client.get(stopped.url + "/healthz")).status_code == 200
    finally:
        for sock in held:
            sock.close()
