"""Shared fixtures: a real uvicorn server on a free port, tokens, clients, a hook backend.

``make_server(**settings)`` starts the gateway app in this test's event loop
(uvicorn ``Server.serve`` as a task, as uvicorn's own tests do) and returns a
``RunningServer``; it is stopped at teardown. ``server`` is one with defaults.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest
import uvicorn

from auth.tokens import make_token
from gateway import compiled
from gateway.app import create_app
from gateway.settings import Settings
from loadtest.ports import free_port as free_port  # below the ephemeral range, never twice

if TYPE_CHECKING:
    from tests.fake_backend import FakeBackend
    from tests.procs import GatewayProcess

SECRET = "test-secret-0123456789abcdef0123456789abcdef"
# GATEWAY_TEST_RAW_WRITES=false runs the in-process servers on uvicorn's stock protocols
# unless a test asks otherwise (scripts/test does so for the contract's end-to-end tests).
RAW_WRITES = os.environ.get("GATEWAY_TEST_RAW_WRITES", "true").lower() != "false"


def pytest_sessionstart(session: pytest.Session) -> None:
    """Refuse to test old code: a compiled module built before its source's last edit
    runs the build, not the edit (setup.py; ``pip install -e .`` builds it again)."""
    stale = compiled.stale_modules()
    if stale:
        raise pytest.UsageError(
            f"compiled before their sources changed: {', '.join(stale)}; "
            "build them again: .venv/bin/pip install -e ."
        )


def token(
    user: str = "alice",
    *,
    subscribe: list[str] | None = None,
    publish: list[str] | None = None,
    info: dict[str, Any] | None = None,
    ttl: float | None = 3600,
    secret: str = SECRET,
) -> str:
    """A valid HS256 token; by default it may subscribe and publish anywhere."""
    return make_token(
        secret,
        user,
        subscribe=["*"] if subscribe is None else subscribe,
        publish=["*"] if publish is None else publish,
        info=info,
        ttl=ttl,
    )


@dataclass
class RunningServer:
    url: str  # http://127.0.0.1:PORT
    ws_url: str  # ws://127.0.0.1:PORT
    port: int
    app: Any
    settings: Settings
    server: uvicorn.Server

    def ws(self, tok: str | None = None, path: str = "/ws") -> str:
        """URL of the WebSocket endpoint with ``token`` (a fresh default one when None)."""
        return f"{self.ws_url}{path}?token={tok if tok is not None else token()}"

    @property
    def gateway(self) -> Any:
        """The app's internals (hub, settings, ...), for assertions on server state."""
        return self.app.state.gateway


def uvicorn_config(app: Any, settings: Settings, port: int, **kw: Any) -> uvicorn.Config:
    from gateway.server.options import uvicorn_options

    return uvicorn.Config(app, host="127.0.0.1", port=port, **{**uvicorn_options(settings), **kw})


@pytest.fixture
async def make_server(
    request: pytest.FixtureRequest,
) -> AsyncIterator[Callable[..., Awaitable[RunningServer]]]:
    started: list[tuple[uvicorn.Server, asyncio.Task[None]]] = []
    # Tests of the gateway's own protocols run on them whatever GATEWAY_TEST_RAW_WRITES says.
    raw_writes = RAW_WRITES or request.node.get_closest_marker("gateway_protocols") is not None

    async def start(
        *,
        uvicorn_options: dict[str, Any] | None = None,
        server_class: type[uvicorn.Server] = uvicorn.Server,
        port: int | None = None,
        **overrides: Any,
    ) -> RunningServer:
        """``overrides`` are settings; ``uvicorn_options`` replace the gateway's own;
        ``port``: this one (say, one a client was told before the server existed)."""
        values: dict[str, Any] = {"jwt_secret": SECRET, "demo": False, "raw_writes": raw_writes}
        values.update(overrides)
        settings = Settings(**values)
        app = create_app(settings)
        port = port or free_port()
        config = uvicorn_config(app, settings, port, log_config=None, **(uvicorn_options or {}))
        server = server_class(config)
        task = asyncio.create_task(server.serve())
        started.append((server, task))
        deadline = time.monotonic() + 10
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("server exited during start-up")
            if time.monotonic() > deadline:
                raise TimeoutError("server did not start")
            await asyncio.sleep(0.01)
        return RunningServer(
            url=f"http://127.0.0.1:{port}",
            ws_url=f"ws://127.0.0.1:{port}",
            port=port,
            app=app,
            settings=settings,
            server=server,
        )

    yield start
    for server, task in reversed(started):
        server.should_exit = True
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), 10)
        if not task.done():
            server.force_exit = True
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


MakeServer = Callable[..., Awaitable[RunningServer]]


@pytest.fixture
async def server(make_server: MakeServer) -> RunningServer:
    return await make_server()


@pytest.fixture
async def stock_pair(make_server: MakeServer) -> tuple[RunningServer, RunningServer]:
    """The gateway on its own protocols, and the same app on stock uvicorn's."""
    return await make_server(), await make_server(raw_writes=False)


@pytest.fixture
async def backend() -> AsyncIterator[FakeBackend]:
    """A hook backend (tests/fake_backend.py) on a free port; ``backend.hooks(...)`` is the
    ``GATEWAY_HOOKS`` setting that sends hooks to it."""
    from tests.fake_backend import serve_fake_backend  # it imports this module

    async with serve_fake_backend() as running:
        yield running


async def eventually(
    predicate: Callable[[], Any], *, timeout: float = 5.0, interval: float = 0.01
) -> Any:
    """Poll ``predicate`` until it returns a truthy value or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


@pytest.fixture(scope="module")
def dev_gateway() -> Iterator[GatewayProcess]:
    """``python -m gateway`` in dev mode (no secret): /dev/token, the demo pages and
    publisher, and the demo backend as its hooks; one per test module."""
    from tests.browser_helpers import wait_ready_sync  # they import this module
    from tests.procs import GatewayProcess

    gateway = GatewayProcess(env={"GATEWAY_LOG_LEVEL": "warning"})
    try:
        wait_ready_sync(gateway.url, gateway.proc, gateway.output)
        yield gateway
    finally:
        gateway.stop()


# --------------------------------------------------------------------------- Redis
# Real redis-server processes (tests/redis_server.py): ``redis_server`` (one per run, keep
# apart with ``redis_prefix``) and ``own_redis_server`` (one per test, to stop or restart).
# Topologies (tests/redis_topologies.py): ``redis_shards``, ``redis_sentinel`` and
# ``redis_cluster`` (one per run, kill nothing), ``own_redis_shards``,
# ``own_redis_sentinel`` and ``own_redis_cluster`` (one per test, to kill or reshard).
# The backend contract suites (tests/contract.py): ``backend_url`` (one per backend) and
# ``make_worker`` (backends on this test's namespace).
from tests.contract import backend_url, make_worker  # noqa: E402, F401
from tests.redis_server import own_redis_server, redis_prefix, redis_server  # noqa: E402, F401
from tests.redis_topologies import (  # noqa: E402, F401
    own_redis_cluster,
    own_redis_sentinel,
    own_redis_shards,
    redis_cluster,
    redis_sentinel,
    redis_shards,
)
