"""The hub over the Redis backend: what a lost pub/sub connection must not cost a subscriber.

Sessions record what they are sent (as in test_hub.py). The subscriber's connection is
held disconnected with a gate on its reconnect, so publications certainly happen while
it is cut off.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from channels.backends import redis as redis_backend
from channels.backends.redis import Connection, RedisBroker
from channels.backends.redis.pubsub import PubSubLink
from channels.broker import Backend, BrokerOptions, BrokerUnavailable, PresenceStore
from channels.hub import Hub
from channels.publication import PresenceEvent, Publication, StreamPosition
from channels.session import Gap
from tests.conftest import eventually
from tests.helpers import poll
from tests.redis_server import RedisServer
from tests.test_hub import new_session
from tests.test_redis_broker import kill_connections


class FlakyPresence:
    """A presence store whose next ``failing_adds`` adds fail as in an outage; the rest
    of ``PresenceStore`` goes to the real store."""

    def __init__(self, store: PresenceStore) -> None:
        self._store = store
        self.failing_adds = 0

    async def add(self, channel: str, client_id: str, entry: bytes) -> bool:
        if self.failing_adds:
            self.failing_adds -= 1
            raise BrokerUnavailable("simulated outage")
        return await self._store.add(channel, client_id, entry)

    async def remove(self, channel: str, client_id: str) -> None:
        await self._store.remove(channel, client_id)

    async def leave(self, channel: str, client_id: str) -> None:
        await self._store.leave(channel, client_id)

    async def expire(self, channel: str) -> None:
        await self._store.expire(channel)

    async def list(self, channel: str) -> list[bytes]:
        return await self._store.list(channel)


class Gated:
    """A Redis backend whose pub/sub connection reconnects only once ``gate`` is set."""

    def __init__(self, url: str, options: BrokerOptions) -> None:
        backend = redis_backend.create(url, options)
        assert isinstance(backend.broker, RedisBroker)
        connection = backend.broker.connection
        assert isinstance(connection, Connection)
        self.connection = connection
        self.connection.reconnect_base, self.connection.reconnect_cap = 0.02, 0.2
        self.gate = asyncio.Event()
        self.gate.set()
        open_pubsub = self.connection._open_pubsub

        async def gated() -> PubSubLink:
            await self.gate.wait()
            return await open_pubsub()

        self.connection._open_pubsub = gated  # type: ignore[method-assign]
        self.presence = FlakyPresence(backend.presence)
        self.backend: Backend = dataclasses.replace(backend, presence=self.presence)

    @property
    def reconnects(self) -> int:
        return self.connection.reconnects


@pytest.fixture
async def broker(redis_server: RedisServer, redis_prefix: str) -> AsyncIterator[Gated]:
    gated = Gated(redis_server.url, BrokerOptions(key_prefix=redis_prefix))
    yield gated
    await gated.backend.broker.close()


@pytest.fixture
async def hub(broker: Gated) -> AsyncIterator[Hub]:
    hub = Hub(broker.backend, presence_enabled=lambda c: c.startswith("chat:"), presence_ttl=0.6)
    await hub.start()
    yield hub
    await hub.close()


@pytest.fixture
async def admin(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


async def cut_off(broker: Gated, admin: Redis) -> None:
    """Drop the broker's pub/sub connection and keep it down until ``broker.gate`` is set."""
    broker.gate.clear()
    assert await kill_connections(admin, broker.connection) >= 1
    await eventually(lambda: not broker.connection.connected)


async def test_publications_missed_while_disconnected_are_recovered_on_a_quiet_channel(
    hub: Hub, broker: Gated, admin: Redis
) -> None:
    """Regression: a channel with subscribers but no publication received yet had no
    position in the hub, so the resync skipped it and what was published while the
    pub/sub connection was down never reached its subscribers."""
    session, recorder, writer = new_session()
    await hub.subscribe(session, "quiet")  # nothing published yet
    await cut_off(broker, admin)
    await hub.publish("quiet", b"1")  # commands still work; pub/sub is down
    await hub.publish("quiet", b"2")
    broker.gate.set()
    await eventually(lambda: broker.reconnects == 1)
    await hub.publish("quiet", b"3")
    await eventually(lambda: recorder.offsets("quiet") == [1, 2, 3])
    writer.cancel()


async def test_publications_missed_while_disconnected_are_recovered_once_in_order(
    hub: Hub, broker: Gated, admin: Redis
) -> None:
    sessions = [new_session() for _ in range(3)]
    for session, _, _ in sessions:
        await hub.subscribe(session, "busy")
    for i in range(5):
        await hub.publish("busy", b"%d" % i)
    await eventually(lambda: all(r.offsets("busy") == [1, 2, 3, 4, 5] for _, r, _ in sessions))
    await cut_off(broker, admin)
    for i in range(5, 20):
        await hub.publish("busy", b"%d" % i)
    broker.gate.set()
    for i in range(20, 25):
        await hub.publish("busy", b"%d" % i)
    expected = list(range(1, 26))
    await eventually(lambda: all(r.offsets("busy") == expected for _, r, _ in sessions))
    assert not any(isinstance(item, Gap) for _, r, _ in sessions for item in r.items)
    for _, _, writer in sessions:
        writer.cancel()


async def test_a_stream_restarted_while_disconnected_gives_a_gap_then_its_new_epoch(
    hub: Hub, broker: Gated, admin: Redis, redis_prefix: str
) -> None:
    """Redis lost the stream (flushed, restarted empty, failed over) while this worker was
    cut off, and others published in the new epoch meanwhile: its subscribers get the gap,
    then every publication of the new epoch, from its first."""
    session, recorder, writer = new_session()
    await hub.subscribe(session, "c")
    old = [await hub.publish("c", b"%d" % n) for n in range(2)]
    await eventually(lambda: recorder.offsets("c") == [1, 2])
    await cut_off(broker, admin)
    await admin.delete(f"{redis_prefix}:m:{{c}}", f"{redis_prefix}:h:{{c}}")
    new = [await hub.publish("c", b"%d" % n) for n in range(3)]
    assert [p.offset for p in new] == [1, 2, 3] and new[0].epoch != old[0].epoch
    broker.gate.set()
    await eventually(lambda: broker.reconnects == 1)
    last = await hub.publish("c", b"live")
    await eventually(lambda: len(recorder.items) == 7)
    seen = [(i.epoch, i.offset) if isinstance(i, Publication) else i for i in recorder.items]
    assert seen == [
        *[(p.epoch, p.offset) for p in old],
        Gap("c", StreamPosition(0, new[0].epoch)),  # the new epoch goes on from its start
        *[(p.epoch, p.offset) for p in new],
        (last.epoch, 4),
    ]
    writer.cancel()


async def test_a_subscribe_while_disconnected_fails_and_leaves_nothing_behind(
    hub: Hub, broker: Gated, admin: Redis
) -> None:
    await cut_off(broker, admin)
    session, _, writer = new_session()
    with pytest.raises(BrokerUnavailable):
        await hub.subscribe(session, "later")
    assert hub.local_subscribers("later") == 0 and not session.channels
    broker.gate.set()
    await eventually(lambda: broker.connection.connected)
    await hub.subscribe(session, "later")
    await hub.publish("later", b"1")
    writer.cancel()


async def test_presence_refresh_survives_a_broker_outage(
    hub: Hub, broker: Gated, admin: Redis, redis_prefix: str
) -> None:
    """Regression: the hub's presence refresh loop ended for good at the first
    ``BrokerUnavailable``, so after a Redis outage every entry expired and never came back."""
    session, recorder, writer = new_session()
    await hub.subscribe(session, "chat:room")
    assert len(await hub.presence("chat:room")) == 1

    def joins() -> list[PresenceEvent]:
        return [i for i in recorder.items if isinstance(i, PresenceEvent) and i.event == "join"]

    await eventually(lambda: len(joins()) == 1)  # its own join
    broker.presence.failing_adds = 2  # the next refresh rounds hit an outage
    await eventually(lambda: broker.presence.failing_adds == 0)
    # Redis lost the entries meanwhile (flushed, restarted empty, expired).
    await admin.delete(f"{redis_prefix}:p:{{chat:room}}", f"{redis_prefix}:z:{{chat:room}}")
    assert await hub.presence("chat:room") == []
    deadline = asyncio.get_running_loop().time() + 3
    while not await hub.presence("chat:room"):
        assert asyncio.get_running_loop().time() < deadline, "presence was not re-added"
        await asyncio.sleep(0.05)
    # Re-added is announced again: the others saw it vanish from the list.
    await eventually(lambda: len(joins()) == 2)
    assert joins()[1].client == session.presence_entry
    writer.cancel()


async def test_a_hole_history_no_longer_covers_is_a_lost_gap_in_the_same_epoch(
    redis_server: RedisServer, admin: Redis, redis_prefix: str
) -> None:
    """Cut off while more was published than history keeps, the worker cannot recover
    the hole: its sessions get a gap marked ``lost`` (the channel goes on in the epoch
    they have; a WebSocket ends on it), then what follows, from history's top."""
    small = Gated(redis_server.url, BrokerOptions(key_prefix=redis_prefix, history_size=3))
    hub = Hub(small.backend, presence_enabled=lambda c: False)
    await hub.start()
    try:
        session, recorder, writer = new_session()
        await hub.subscribe(session, "c")
        first = await hub.publish("c", b"1")
        await eventually(lambda: recorder.offsets("c") == [1])
        await cut_off(small, admin)
        for n in range(2, 10):  # history keeps 7, 8, 9
            await hub.publish("c", b"%d" % n)
        small.gate.set()
        await eventually(lambda: small.reconnects == 1)
        await hub.publish("c", b"10")
        await eventually(lambda: recorder.offsets("c")[-1:] == [10])
        gaps = [item for item in recorder.items if isinstance(item, Gap)]
        assert gaps == [Gap("c", StreamPosition(9, first.epoch), lost=True)]
        assert recorder.offsets("c") == [1, 10]
        writer.cancel()
    finally:
        await hub.close()
        await small.backend.broker.close()


async def test_an_unregister_whose_caller_is_cancelled_still_leaves_every_channel(
    hub: Hub, broker: Gated, admin: Redis, redis_prefix: str
) -> None:
    """Regression: a WebSocket's writer unregistering its session (presence leaves,
    unsubscribes: Redis calls) was cancelled when the client's close came meanwhile,
    and the loop stopped half way: the session stayed in the channels not left yet and
    the worker subscribed in Redis to channels nobody here read (44 a second under a
    churn of bad-frame closes). The leaving goes on whatever happens to its caller."""
    session, _, writer = new_session()
    channels = ["chat:a", "chat:b", "d:1", "d:2", "d:3"]
    for channel in channels:
        await hub.subscribe(session, channel)
    await admin.client_pause(300, all=False)  # (WRITE) the presence leave waits on Redis
    leaving = asyncio.ensure_future(hub.unregister(session))
    await asyncio.sleep(0)  # (it started)
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    await eventually(lambda: not session.channels and not hub._channels, timeout=10)
    topics = [f"{redis_prefix}:t:{{{channel}}}" for channel in channels]
    await poll(lambda: all_unsubscribed(admin, topics), timeout=10)
    writer.cancel()


async def all_unsubscribed(admin: Redis, topics: list[str]) -> bool:
    return all(count == 0 for _, count in await admin.pubsub_numsub(*topics))
