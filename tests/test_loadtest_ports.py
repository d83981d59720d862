"""The load generator's ports: one run never starts a server on a port a run beside it
holds, and never takes a neighbour's server for its own."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from loadtest.ports import ephemeral_low, family, free_port, holds_listener
from loadtest.servers import TargetServer

ROOT = Path(__file__).resolve().parent.parent
HOLDER = """
import sys
from loadtest.ports import free_port
print(" ".join(str(free_port()) for _ in range(int(sys.argv[1]))), flush=True)
sys.stdin.read()
"""
CHECKER = """
import fcntl, os, sys
from loadtest.ports import LOCKS
fd = os.open(LOCKS, os.O_CREAT | os.O_RDWR, 0o666)
for port in sys.argv[1:]:
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, int(port))
    except OSError:
        print(port)
"""


def locked_elsewhere(ports: list[int]) -> set[int]:
    """Which of ``ports`` some process holds, as a third process sees it (a record lock
    tried here would be this process's own, and closing it would drop free_port's)."""
    out = subprocess.run(
        [sys.executable, "-c", CHECKER, *map(str, ports)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {int(line) for line in out.split()}


@pytest.fixture
def holder() -> Iterator[tuple[subprocess.Popen[str], list[int]]]:
    """A process beside this one holding 200 ports it chose."""
    with subprocess.Popen(
        [sys.executable, "-c", HOLDER, "200"],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        ports = [int(p) for p in proc.stdout.readline().split()]
        try:
            yield proc, ports
        finally:
            proc.kill()


def test_a_port_held_by_another_process_is_never_chosen(
    holder: tuple[subprocess.Popen[str], list[int]],
) -> None:
    proc, theirs = holder
    assert len(set(theirs)) == 200
    assert locked_elsewhere(theirs) == set(theirs)
    # Ours avoid all of theirs, with no listener on any yet: only the locks tell them apart.
    ours = [free_port() for _ in range(300)]
    assert len(set(ours)) == 300
    assert not set(ours) & set(theirs)
    proc.kill()
    proc.wait()
    assert locked_elsewhere(theirs) == set()  # gone with the process
    assert locked_elsewhere(ours) == set(ours)  # this process's, still held


def test_ports_come_from_below_the_ephemeral_range() -> None:
    """No outgoing connection (the kernel's ephemeral ports) can sit on one."""
    if ephemeral_low() - 15000 < 1000:
        pytest.fail(f"this machine's ephemeral range starts at {ephemeral_low()}")
    for _ in range(20):
        port = free_port()
        assert 15000 <= port < ephemeral_low()
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # free indeed


class Ready(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def neighbour() -> Iterator[int]:
    """Another run's server, answering 200 to everything on a port of its own."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Ready)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def test_holds_listener_tells_the_listening_process(neighbour: int) -> None:
    assert holds_listener(os.getpid(), neighbour) is True
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as child:
        try:
            assert holds_listener(child.pid, neighbour) is False
        finally:
            child.kill()
    assert holds_listener(child.pid, neighbour) is None  # no such process any more


async def test_a_server_is_never_taken_for_the_neighbour_on_its_port(neighbour: int) -> None:
    """The failure this guards against: a server that cannot bind its port exits, while
    the one already there answers the readiness probe."""
    argv = [sys.executable, "-m", "http.server", str(neighbour), "--bind", "127.0.0.1"]
    ours = TargetServer("ours", argv, neighbour, ready_path="/").start()
    try:
        with pytest.raises(RuntimeError, match="exited during start-up") as failed:
            await asyncio.wait_for(ours.wait_ready(30.0), 60.0)
        assert "Address already in use" in str(failed.value)
    finally:
        ours.stop()


async def test_a_server_on_its_own_port_is_ready() -> None:
    port = free_port()
    argv = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
    ours = TargetServer("ours", argv, port, ready_path="/").start()
    try:
        await asyncio.wait_for(ours.wait_ready(30.0), 60.0)
        assert ours.answers_on(port)
    finally:
        ours.stop()


async def test_a_server_whose_workers_hold_the_port_is_ready() -> None:
    """The gateway's ``--workers``: the parent binds, hands the socket on and closes it."""
    port = free_port()
    serve = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
    argv = [sys.executable, "-c", f"import subprocess; subprocess.run({serve!r})"]
    ours = TargetServer("ours", argv, port, ready_path="/").start()
    try:
        await asyncio.wait_for(ours.wait_ready(30.0), 60.0)
        workers = family(ours.pid)[1:]
        assert len(workers) == 1 and holds_listener(workers[0], port) is True
        assert ours.answers_on(port)
    finally:
        workers = family(ours.pid)[1:]
        ours.stop()
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
