"""What the contract suites (tests/test_contract_*.py) share.

Each contract test runs unchanged over every backend (``backend_url`` is parametrized),
as uvicorn runs its WebSocket tests over each implementation. A test gets a namespace of
its own: ``memory://<unique name>``, or one of the session's Redis topologies under a
unique key prefix: one redis-server (tests/redis_server.py), two shards, a Sentinel
master with its replica, a three-master Cluster (tests/redis_topologies.py).
``make_worker`` creates a backend on it, as one worker of a cluster would, and closes it
at teardown; a test may create several.

The fixtures are made visible to every test module by tests/conftest.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from channels.backend_url import create_backend
from channels.broker import Backend, Broker, BrokerOptions, ChannelFilter, PresenceStore, Signals
from channels.publication import Message, PresenceEvent, Publication

# memory, one Redis, and the topologies past one Redis (tests/redis_topologies.py).
BACKENDS = ["memory", "redis", "redis-shards", "redis-sentinel", "redis-cluster"]
TOPOLOGIES = {
    "redis": "redis_server",
    "redis-shards": "redis_shards",
    "redis-sentinel": "redis_sentinel",
    "redis-cluster": "redis_cluster",
}


class Received:
    """What one worker's handlers were given."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.resyncs = 0
        self.resynced: list[ChannelFilter] = []  # which channels each resync was for
        self.signals: list[bytes] = []

    def on_message(self, message: Message) -> None:
        self.messages.append(message)

    def on_resync(self, which: ChannelFilter) -> None:
        self.resyncs += 1
        self.resynced.append(which)

    def on_signal(self, data: bytes) -> None:
        self.signals.append(data)

    def publications(self, channel: str) -> list[Publication]:
        return [m for m in self.messages if isinstance(m, Publication) and m.channel == channel]

    def events(self) -> list[PresenceEvent]:
        return [m for m in self.messages if isinstance(m, PresenceEvent)]


@dataclass
class Worker:
    backend: Backend
    received: Received = field(default_factory=Received)

    @property
    def broker(self) -> Broker:
        return self.backend.broker

    @property
    def presence(self) -> PresenceStore:
        return self.backend.presence

    @property
    def signals(self) -> Signals:
        return self.backend.signals

    async def start(self) -> None:
        await self.broker.start(self.received.on_message, self.received.on_resync)

    def listen(self) -> None:
        self.signals.listen(self.received.on_signal)


MakeWorker = Callable[..., Awaitable[Worker]]


@pytest.fixture(params=BACKENDS)
def backend_url(request: pytest.FixtureRequest, redis_prefix: str) -> str:
    """This test's namespace: a memory namespace of its own, or one of the session's Redis
    topologies (keys kept apart by ``redis_prefix``)."""
    if request.param == "memory":
        return f"memory://{redis_prefix}"
    return str(request.getfixturevalue(TOPOLOGIES[request.param]).url)


@pytest.fixture
async def make_worker(backend_url: str, redis_prefix: str) -> AsyncIterator[MakeWorker]:
    """Backends of this test's namespace (like the workers of one deployment), listening
    to signals and started unless told otherwise, closed at teardown."""
    opened: list[Worker] = []

    async def make(*, start: bool = True, listen: bool = True, **options: Any) -> Worker:
        options.setdefault("key_prefix", redis_prefix)
        worker = Worker(create_backend(backend_url, BrokerOptions(**options)))
        opened.append(worker)
        if listen:
            worker.listen()
        if start:
            await worker.start()
        return worker

    yield make
    for worker in opened:
        await worker.broker.close()
