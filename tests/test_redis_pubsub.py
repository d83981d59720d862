"""The pub/sub connection read by hiredis (channels/backends/redis/pubsub.py) on the ways a
deployment reaches Redis: RESP2 and RESP3, TLS; what one loop turn's subscribes cost Redis;
a reply Redis refuses with an error; on RESP3 a channel's position read behind its
SUBSCRIBE, in one round trip, and joins racing a publisher that way."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import ipaddress
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from redis.asyncio import Redis

from channels.backends import redis as redis_backend
from channels.backends.redis import connection
from channels.broker import Broker, BrokerOptions, BrokerUnavailable, HistoryPage, HistoryQuery
from channels.hub import Hub, SubscribeResult
from channels.publication import PresenceEvent, StreamPosition
from loadtest.ports import free_port
from tests.conftest import eventually
from tests.helpers import poll
from tests.redis_server import RedisServer
from tests.test_hub import Recorder, new_session
from tests.test_redis_broker import MakeWorker, Worker, kill_connections, worker_factory


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (its own CA) and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[RedisServer, str]]:
    """A redis-server with a TLS port beside its plain one (which the admin client and the
    readiness check use), and a ``rediss://`` URL that verifies its certificate."""
    cert, key = self_signed(tmp_path)
    tls_port = free_port()
    server = RedisServer(
        extra_args=[
            "--tls-port",
            str(tls_port),
            "--tls-cert-file",
            str(cert),
            "--tls-key-file",
            str(key),
            "--tls-ca-cert-file",
            str(cert),
            "--tls-auth-clients",
            "no",
        ]
    )
    try:
        server.start()
    except RuntimeError as exc:
        pytest.fail(f"this test needs a redis-server built with TLS (Debian's): {exc}")
    yield server, f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={cert}"
    server.close()


@pytest.fixture
async def workers(
    own_redis_server: RedisServer, redis_prefix: str
) -> AsyncIterator[Callable[..., MakeWorker]]:
    """``workers(query)``: a factory of started workers on this test's own redis-server,
    its URL ending with ``query`` (e.g. ``?protocol=2``); all closed at teardown."""
    opened: list[list[Worker]] = []

    def on(query: str = "") -> MakeWorker:
        make, made = worker_factory(own_redis_server.url + query, redis_prefix)
        opened.append(made)
        return make

    yield on
    for made in opened:
        for worker in made:
            await worker.broker.close()


@pytest.fixture
async def admin_of(own_redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(own_redis_server.url)
    yield client
    await client.aclose()


async def numsub(admin: Redis, topic: str) -> int:
    return int((await admin.pubsub_numsub(topic))[0][1])


async def test_over_tls_it_subscribes_receives_and_reconnects(
    tls_server: tuple[RedisServer, str], redis_prefix: str
) -> None:
    server, url = tls_server
    make, opened = worker_factory(url, redis_prefix)
    admin = Redis.from_url(server.url)
    try:
        subscriber, publisher = await make(), await make()
        await subscriber.broker.subscribe("c")
        await publisher.broker.publish("c", b"1")
        await eventually(lambda: len(subscriber.received.publications("c")) == 1)
        # The server drops the connection: the reader sees it go (TLS's own close), and
        # comes back subscribed over a new one.
        assert await kill_connections(admin, subscriber.connection) >= 1
        await eventually(lambda: subscriber.reconnects == 1 and subscriber.received.resyncs)
        await publisher.broker.publish("c", b"2")
        await eventually(lambda: len(subscriber.received.publications("c")) == 2)
        assert [p.data for p in subscriber.received.publications("c")] == [b"1", b"2"]
    finally:
        for worker in opened:
            await asyncio.wait_for(worker.broker.close(), 5)  # no close waits for good
        await admin.aclose()


async def calls(admin: Redis, command: str) -> int:
    stats = await admin.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


@pytest.mark.parametrize("protocol", [2, 3])
async def test_both_protocol_versions(
    workers: Callable[..., MakeWorker], protocol: int, admin_of: Redis, redis_prefix: str
) -> None:
    """RESP2 replies with arrays, RESP3 with pushes: messages, confirmations and PONGs
    of either are read."""
    make = workers(f"?protocol={protocol}")
    subscriber, publisher = await make(), await make()
    subscriber.connection.ping_interval = 0.05  # PINGed at each of the reader's checks
    await subscriber.broker.subscribe("c")
    topic = f"{redis_prefix}:t:{{c}}"
    assert await numsub(admin_of, topic) == 1
    await publisher.broker.publish("c", b"1")
    await eventually(lambda: len(subscriber.received.publications("c")) == 1)
    pings = await calls(admin_of, "ping")

    async def pinged_twice() -> bool:
        return await calls(admin_of, "ping") >= pings + 2

    await poll(pinged_twice, timeout=10)
    await publisher.broker.publish("c", b"2")
    await eventually(lambda: len(subscriber.received.publications("c")) == 2)
    assert subscriber.reconnects == 0  # the PONGs were read as such
    await subscriber.broker.unsubscribe("c")

    async def gone() -> bool:
        return await numsub(admin_of, topic) == 0

    await poll(gone)


async def test_the_subscribes_of_one_loop_turn_are_one_command(
    workers: Callable[..., MakeWorker], admin_of: Redis, redis_prefix: str
) -> None:
    make = workers()
    worker = await make()
    before = await calls(admin_of, "subscribe")
    await asyncio.gather(*(worker.broker.subscribe(f"c{i}") for i in range(50)))
    assert await calls(admin_of, "subscribe") == before + 1
    for i in (0, 49):
        assert await numsub(admin_of, f"{redis_prefix}:t:{{c{i}}}") == 1
    # A subscribe and an unsubscribe of one topic in one turn reach Redis in that order.
    subscribing = asyncio.ensure_future(worker.broker.subscribe("x"))
    await asyncio.sleep(0)  # the subscribe is queued, not yet written
    await worker.broker.unsubscribe("x")
    await subscribing
    assert await numsub(admin_of, f"{redis_prefix}:t:{{x}}") == 0


async def test_an_error_reply_ends_the_connection_and_it_comes_back(
    workers: Callable[..., MakeWorker],
) -> None:
    """Redis answers an error (in a cluster: MOVED for a slot that moved): the reader does not
    guess which topic it was for, it reconnects, resubscribes everything and resyncs."""
    make = workers("?protocol=2")
    subscriber, publisher = await make(), await make()
    await subscriber.broker.subscribe("c")
    link = subscriber.connection._link
    assert link is not None
    link.send(b"GET", b"k")  # not allowed on a RESP2 connection in pub/sub mode
    await eventually(lambda: subscriber.reconnects == 1 and subscriber.received.resyncs)
    assert link.lost.done() and "only" in str(link.lost.result())
    await publisher.broker.publish("c", b"1")
    await eventually(lambda: subscriber.received.publications("c"))


async def test_a_call_left_unanswered_gives_the_connection_up(
    workers: Callable[..., MakeWorker], admin_of: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Calls on the pub/sub connection have no timer each: when none is answered for
    ``COMMAND_TIMEOUT`` (Redis paused, a partition), the reader gives the connection up,
    the waiting call fails (a presence add: ``BrokerUnavailable``) before Redis answers,
    and the reader reconnects, resubscribed."""
    monkeypatch.setattr(connection, "COMMAND_TIMEOUT", 0.5)
    worker = await (workers("?protocol=3"))()
    worker.connection.ping_interval = 60.0  # (the silence check out of it)
    await worker.broker.subscribe("c")
    loop = asyncio.get_running_loop()
    await admin_of.client_pause(4000, all=True)  # every command
    started = loop.time()
    with pytest.raises(BrokerUnavailable):
        await worker.presence.add("c", "c-1", b"{}")
    assert loop.time() - started < 3.5  # given up, not answered at the pause's end
    await eventually(lambda: worker.reconnects >= 1 and worker.received.resyncs >= 1, timeout=10)
    await worker.broker.publish("c", b"1")
    await eventually(lambda: worker.received.publications("c"))


@pytest.mark.parametrize("protocol", [2, 3])
async def test_a_command_behind_a_subscribe_is_its_confirmation_on_resp3(
    workers: Callable[..., MakeWorker], protocol: int, admin_of: Redis
) -> None:
    make = workers(f"?protocol={protocol}")
    worker = await make()
    connection = worker.connection
    reply = await connection.subscribe(b"t1", lambda payload: None, (b"ECHO", b"after"))
    assert reply == (b"after" if protocol == 3 else None)  # RESP2: not sent
    assert await numsub(admin_of, "t1") == 1
    # Refused by Redis: None (the caller makes it apart), the subscription stands.
    refused = (b"EVALSHA", b"0" * 40, 0)
    assert await connection.subscribe(b"t2", lambda payload: None, refused) is None
    assert await numsub(admin_of, "t2") == 1
    # A topic already subscribed: nothing sent, None.
    assert await connection.subscribe(b"t1", lambda payload: None, (b"ECHO", b"x")) is None
    # A call's reply shaped like a message is the call's (on RESP3 only pushes are
    # messages), not the handler's.
    got: list[bytes] = []
    looks_like = (b"EVAL", b"return {'message', 't3', 'x'}", 0)
    reply = await connection.subscribe(b"t3", got.append, looks_like)
    assert reply == ([b"message", b"t3", b"x"] if protocol == 3 else None)
    assert got == []


async def test_a_history_read_rides_behind_the_subscribe_and_survives_a_flushed_cache(
    workers: Callable[..., MakeWorker], admin_of: Redis
) -> None:
    make = workers()
    subscriber, publisher = await make(), await make()
    published = [await publisher.broker.publish("c", b"%d" % i) for i in range(3)]
    await publisher.broker.history("c")  # the history script loaded (as on a live Redis)
    page = await subscriber.broker.subscribe("c", HistoryQuery(since=published[0].position))
    assert page is not None and page.complete
    assert page.position == published[-1].position
    assert [p.offset for p in page.publications] == [2, 3]
    # It ran on a pub/sub connection (one with a subscription): the subscriber's.
    clients = await admin_of.client_list()
    assert "evalsha" in [c["cmd"] for c in clients if int(c["sub"]) > 0]
    await admin_of.script_flush()
    assert await subscriber.broker.subscribe("d", HistoryQuery(limit=0)) is None
    assert (await subscriber.broker.history("d")).position.offset == 0  # loads it again
    await publisher.broker.publish("d", b"x")
    await eventually(lambda: subscriber.received.publications("d"))


class CountingHistory:
    """A broker whose ``history`` calls are counted (the rest is the real broker's)."""

    def __init__(self, broker: Broker) -> None:
        self._broker = broker
        self.reads = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._broker, name)

    async def history(
        self, channel: str, *, since: StreamPosition | None = None, limit: int | None = None
    ) -> HistoryPage:
        self.reads += 1
        return await self._broker.history(channel, since=since, limit=limit)


@pytest.mark.parametrize(
    ("protocol", "presence"), [(2, False), (3, False), (3, True)], ids=["resp2", "resp3", "chat"]
)
async def test_joins_of_new_channels_racing_a_publisher_get_each_offset_once_in_order(
    workers: Callable[..., MakeWorker],
    protocol: int,
    presence: bool,
    own_redis_server: RedisServer,
    redis_prefix: str,
) -> None:
    """Each join is the worker's first on its channel (a SUBSCRIBE and a read of where the
    channel is) while another worker publishes to it: what the read gave, then live, each
    offset once. On RESP3 the read goes behind the SUBSCRIBE (no separate history read),
    on channels with presence too (whose joins add an entry and announce it)."""
    url = f"{own_redis_server.url}?protocol={protocol}"
    backend = redis_backend.create(url, BrokerOptions(key_prefix=redis_prefix))
    counting = CountingHistory(backend.broker)
    hub = Hub(
        dataclasses.replace(backend, broker=counting),
        presence_enabled=lambda c: presence,
    )
    make = workers(f"?protocol={protocol}")
    await hub.start()
    channels = [f"c{i}" for i in range(40)]
    rounds = 60
    try:
        publisher = (await make()).broker
        await publisher.history("c0")  # the history script loaded (a fresh Redis: NOSCRIPT)

        async def publish_all() -> None:
            for n in range(rounds):
                for channel in channels:
                    await publisher.publish(channel, b"%d" % n)

        publishing = asyncio.create_task(publish_all())
        joined = []
        for channel in channels:
            session, recorder, writer = new_session()
            result = await hub.subscribe(session, channel)
            joined.append((channel, recorder, result, writer))
            await asyncio.sleep(0.005)
        await publishing
        assert any(0 < r.position.offset < rounds for _c, _r, r, _w in joined)  # raced
        for channel, recorder, result, _writer in joined:
            expected = list(range(result.position.offset + 1, rounds + 1))

            def caught_up(
                r: Recorder = recorder, c: str = channel, e: list[int] = expected
            ) -> bool:
                return r.offsets(c) == e

            await eventually(caught_up)
        # RESP3: no read apart, and no recovery either (a join that missed a publication
        # sees an offset gap and recovers from history: it would be counted here).
        assert counting.reads == (0 if protocol == 3 else len(channels))
        if presence:  # each in its room's presence, its join announced
            for channel, recorder, _result, _writer in joined[:3]:
                assert len(await hub.presence(channel)) == 1

                def announced(r: Recorder = recorder) -> bool:
                    return any(isinstance(i, PresenceEvent) for i in r.items)

                await eventually(announced)
        for *_rest, writer in joined:
            writer.cancel()
    finally:
        await hub.close()


@pytest.mark.parametrize("protocol", [2, 3], ids=["resp2", "resp3"])
async def test_joins_of_a_room_this_worker_relays_read_no_history(
    workers: Callable[..., MakeWorker],
    protocol: int,
    own_redis_server: RedisServer,
    redis_prefix: str,
) -> None:
    """Joins of a channel with presence that the worker relays already (a chat room with
    someone in it), racing a publisher on another worker: each adds its entry, then
    joins from where the worker is, with no history read (the room's first join reads
    it, apart on RESP2), and gets each offset after its position once, in order; each
    is in the room's presence and its join announced to those there before it."""
    url = f"{own_redis_server.url}?protocol={protocol}"
    backend = redis_backend.create(url, BrokerOptions(key_prefix=redis_prefix))
    counting = CountingHistory(backend.broker)
    hub = Hub(dataclasses.replace(backend, broker=counting), presence_enabled=lambda c: True)
    make = workers(f"?protocol={protocol}")
    await hub.start()
    rounds, joiners = 300, 30
    try:
        publisher = (await make()).broker
        await publisher.history("room")  # the history script loaded (a fresh Redis: NOSCRIPT)
        first, first_recorder, first_writer = new_session()
        await hub.subscribe(first, "room")
        reads = counting.reads  # the first join's: 0 on RESP3 (behind the SUBSCRIBE)

        async def publish_all() -> None:
            for n in range(rounds):
                await publisher.publish("room", b"%d" % n)

        publishing = asyncio.create_task(publish_all())
        joined: list[tuple[Recorder, SubscribeResult, asyncio.Task[bool]]] = []
        while len(joined) < joiners:
            session, recorder, writer = new_session()
            joined.append((recorder, await hub.subscribe(session, "room"), writer))
            await asyncio.sleep(0.002)
        await publishing
        assert any(0 < result.position.offset < rounds for _r, result, _w in joined)  # raced
        for recorder, result, _writer in joined:
            expected = list(range(result.position.offset + 1, rounds + 1))

            def caught_up(r: Recorder = recorder, e: list[int] = expected) -> bool:
                return r.offsets("room") == e

            await eventually(caught_up)
        assert counting.reads == reads == (1 if protocol == 2 else 0)  # no recovery either
        assert len(await hub.presence("room")) == joiners + 1

        def announced() -> bool:
            events = [i for i in first_recorder.items if isinstance(i, PresenceEvent)]
            return len([e for e in events if e.event == "join"]) >= joiners

        await eventually(announced)
        for _recorder, _result, writer in joined:
            writer.cancel()
        first_writer.cancel()
    finally:
        await hub.close()


async def test_a_subscribe_cancelled_while_it_waits_leaves_nothing_subscribed(
    workers: Callable[..., MakeWorker], admin_of: Redis
) -> None:
    """A client gone while its first subscribe of a channel waits for Redis: the SUBSCRIBE
    already went out, so an UNSUBSCRIBE follows it (else the worker would get the
    channel's messages for good, for no one)."""
    make = workers()
    connection = (await make()).connection
    waiting = asyncio.create_task(connection.subscribe(b"gone", lambda payload: None))
    await asyncio.sleep(0)  # the SUBSCRIBE is queued; its confirmation is awaited
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting

    async def unsubscribed() -> bool:
        return await calls(admin_of, "unsubscribe") == 1 and await numsub(admin_of, "gone") == 0

    await poll(unsubscribed)
    # Subscribed again, it stands (the UNSUBSCRIBE is not sent twice).
    await connection.subscribe(b"gone", lambda payload: None)
    assert await numsub(admin_of, "gone") == 1


async def test_presence_adds_and_events_ride_the_pubsub_connection_on_resp3(
    workers: Callable[..., MakeWorker], admin_of: Redis, redis_prefix: str
) -> None:
    """A join's and a leave's small calls (the presence entry added or removed, the event's
    PUBLISH) go with the other calls of their loop turn on the pub/sub connection; a Redis
    that lost its scripts still takes them (through the pool, which loads the script)."""
    make = workers()
    worker, listener = await make(), await make()
    await listener.broker.subscribe("chat:r")
    assert await worker.presence.add("chat:r", "c-1", b"{}") is True
    assert await worker.presence.add("chat:r", "c-1", b"{}") is False  # refreshed

    async def pubsub_commands() -> list[str]:
        clients = await admin_of.client_list()
        return [c["cmd"] for c in clients if int(c["sub"]) > 0]

    assert "evalsha" in await pubsub_commands()
    await worker.broker.publish_event("chat:r", "join", b"{}")
    assert "publish" in await pubsub_commands()
    await eventually(lambda: [e for e in listener.received.events() if e.channel == "chat:r"])
    await admin_of.script_flush()
    assert await worker.presence.add("chat:r", "c-2", b"{}") is True
    assert sorted(await worker.presence.list("chat:r")) == [b"{}", b"{}"]
    await worker.presence.remove("chat:r", "c-1")  # (its script loaded again too)
    await worker.presence.remove("chat:r", "c-1")
    assert await worker.presence.list("chat:r") == [b"{}"]
    entries, expiry = f"{redis_prefix}:p:{{chat:r}}", f"{redis_prefix}:z:{{chat:r}}"
    assert await admin_of.hkeys(entries) == [b"c-2"]
    assert await admin_of.zrange(expiry, 0, -1) == [b"c-2"]
