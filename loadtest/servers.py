"""Processes the tool starts itself: redis-server and the server under test, pinned to CPUs.

The server under test runs as ``taskset -c <cpus> python -m ...`` (or with
``sched_setaffinity`` when ``taskset`` is missing), so its pid is the Python process's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Self

from loadtest import callgrind
from loadtest.config import USABLE_CPUS
from loadtest.ports import free_port, holds_listener

ROOT = Path(__file__).resolve().parent.parent


def cpu_list(cpus: list[int]) -> str:
    return ",".join(str(c) for c in cpus)


def pinned(argv: list[str], cpus: list[int] | None) -> list[str]:
    if cpus and shutil.which("taskset"):
        return ["taskset", "-c", cpu_list(cpus), *argv]
    return argv


class ManagedProcess:
    """A child process with its output in a log file, stopped with SIGTERM then SIGKILL."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        *,
        env: Mapping[str, str] | None = None,
        cpus: list[int] | None = None,
    ) -> None:
        self.name = name
        self.cpus = cpus
        self.argv = pinned(argv, cpus)
        self.env = dict(env) if env is not None else dict(os.environ)
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed in stop()
            prefix=f"loadtest-{name}-", suffix=".log", delete=False
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.scratch: list[str] = []  # directories removed once the process has stopped

    @property
    def command(self) -> str:
        return " ".join(self.argv)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> Self:
        cpus = self.cpus

        def pin() -> None:
            # taskset missing: pin in the child before exec. No CPUs given: all usable
            # ones, not the load-generator CPUs the coordinator pinned itself to.
            if cpus and not shutil.which("taskset"):
                os.sched_setaffinity(0, cpus)
            elif not cpus:
                os.sched_setaffinity(0, USABLE_CPUS)

        self.proc = subprocess.Popen(
            self.argv,
            cwd=ROOT,
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=pin,
        )
        return self

    def output(self, tail: int = 4000) -> str:
        try:
            return Path(self.log.name).read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def answers_on(self, port: int) -> bool:
        """Whether what answered on ``port`` is this process, not one that had the port
        first (this one then fails to bind and exits); True when /proc cannot tell."""
        return self.running() and holds_listener(self.pid, port) is not False

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()
        with contextlib.suppress(OSError):
            os.unlink(self.log.name)
        for scratch in self.scratch:  # what the process wrote until it ended
            shutil.rmtree(scratch, ignore_errors=True)


class RedisServer(ManagedProcess):
    def __init__(self, cpus: list[int] | None = None, port: int | None = None) -> None:
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="loadtest-redis-")
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(
                "no redis-server on PATH: install it (apt-get install redis-server) "
                "or pass --redis-url"
            )
        argv = [
            binary,
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
            "--loglevel",
            "warning",
            "--maxclients",
            "10000",
        ]
        super().__init__("redis", argv, cpus=cpus)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not self.running():
                raise RuntimeError(f"redis-server exited:\n{self.output()}")
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.write(b"PING\r\n")
                line = await asyncio.wait_for(reader.readline(), 2)
                writer.close()
                if line.startswith(b"+PONG") and self.answers_on(self.port):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("redis-server did not answer PING")
            await asyncio.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        super().stop(timeout)
        shutil.rmtree(self.dir, ignore_errors=True)


class TargetServer(ManagedProcess):
    """The server under test on 127.0.0.1:``port``; ready when ``GET /healthz`` is 200."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        port: int,
        *,
        env: Mapping[str, str] | None = None,
        cpus: list[int] | None = None,
        ready_path: str = "/healthz",
    ) -> None:
        super().__init__(name, argv, env=env, cpus=cpus)
        self.port = port
        self.ready_path = ready_path

    async def wait_ready(self, timeout: float = 90.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(timeout=2.0) as client:
            while True:
                if not self.running():
                    raise RuntimeError(f"{self.name} exited during start-up:\n{self.output()}")
                with contextlib.suppress(httpx.TransportError):
                    url = f"http://127.0.0.1:{self.port}{self.ready_path}"
                    if (await client.get(url)).status_code == 200 and self.answers_on(self.port):
                        return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.name} not ready:\n{self.output()}")
                await asyncio.sleep(0.1)


def gateway_server(
    port: int,
    *,
    broker_url: str,
    secret: str,
    cpus: list[int] | None,
    extra_env: Mapping[str, str] | None = None,
) -> TargetServer:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(
        {
            "GATEWAY_JWT_SECRET": secret,
            "GATEWAY_BROKER_URL": broker_url,
            "GATEWAY_MAX_CONNECTIONS": "1000000",
            "GATEWAY_DEMO": "false",
            "GATEWAY_LOG_LEVEL": "warning",
            "GATEWAY_DRAIN_SECONDS": "2",
        }
    )
    env.update(extra_env or {})
    # LOADTEST_TRACE: the gateway with the timestamps of loadtest.tracing (fanout --trace).
    module = "loadtest.tracing" if env.get("LOADTEST_TRACE") else "gateway"
    argv = [sys.executable, "-m", module, "--host", "127.0.0.1", "--port", str(port)]
    out = env.get(callgrind.ENV)  # --instructions: the server's instructions counted
    if out:
        argv = callgrind.wrapped(argv, out)
    server = TargetServer("gateway", argv, port, env=env, cpus=cpus, ready_path="/readyz")
    server.scratch += [os.path.dirname(out)] if out else []
    return server


class GatewayFleet:
    """Several single-worker gateways on ports of their own behind one broker (a load
    balancer's backends), each stopped, killed or started again on its own."""

    def __init__(
        self,
        n: int,
        *,
        broker_url: str,
        secret: str,
        cpus: list[int] | None,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        self.ports = [free_port() for _ in range(n)]
        self.broker_url, self.secret, self.cpus = broker_url, secret, cpus
        self.extra_env = dict(extra_env or {})
        self.servers = [self._make(port) for port in self.ports]
        self.generation = [0] * n  # times each was started again

    def _make(self, port: int) -> TargetServer:
        server = gateway_server(
            port,
            broker_url=self.broker_url,
            secret=self.secret,
            cpus=self.cpus,
            extra_env=self.extra_env,
        )
        server.name = f"gateway-{self.ports.index(port)}"
        return server

    async def start_all(self, timeout: float = 120.0) -> None:
        """Start every gateway; several starting at once on a busy machine take a while."""
        for server in self.servers:
            server.start()
        await asyncio.gather(*(server.wait_ready(timeout) for server in self.servers))

    def running(self) -> list[bool]:
        return [server.running() for server in self.servers]

    async def stop(self, i: int) -> None:
        """SIGTERM and wait: the gateway drains (close 1012) and exits."""
        await asyncio.get_running_loop().run_in_executor(None, self.servers[i].stop)

    async def kill(self, i: int) -> None:
        """SIGKILL: no drain, its clients see their connections vanish."""
        server = self.servers[i]
        if server.proc is not None and server.running():
            server.proc.kill()
            await asyncio.get_running_loop().run_in_executor(None, server.proc.wait)
        server.stop()

    async def start(self, i: int) -> TargetServer:
        """Start gateway ``i`` again on its port; returns once it is ready."""
        server = self.servers[i] = self._make(self.ports[i])
        self.generation[i] += 1
        server.start()
        await server.wait_ready(60.0)
        return server

    def stop_all(self) -> None:
        for server in self.servers:
            server.stop()


def baseline_server(
    name: str,
    module: str,
    port: int,
    *,
    redis_url: str,
    cpus: list[int] | None,
    callgrind_out: str | None = None,
) -> TargetServer:
    argv = [sys.executable, "-m", module, "--port", str(port), "--redis-url", redis_url]
    if callgrind_out:  # --instructions
        argv = callgrind.wrapped(argv, callgrind_out)
    server = TargetServer(name, argv, port, cpus=cpus)
    server.scratch += [os.path.dirname(callgrind_out)] if callgrind_out else []
    return server


def new_secret() -> str:
    return secrets.token_hex(32)
