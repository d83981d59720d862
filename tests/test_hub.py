"""The hub in-process over the memory broker: joining a live channel loses and repeats nothing.

The transport here records what the session writes; the real transports are
covered end to end in test_ws_*.py and test_sse.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
from collections.abc import AsyncIterator
from typing import Any

import pytest

from channels.backend_url import create_backend
from channels.broker import Broker, BrokerOptions, HistoryPage
from channels.fanout import gone_on_from
from channels.hub import Hub, SubscribeResult
from channels.publication import Batch, PresenceEvent, Publication, StreamPosition
from channels.session import Ending, Gap, Outgoing, Session
from tests.conftest import eventually


class Recorder:
    def __init__(self) -> None:
        self.items: list[Outgoing] = []

    async def write(self, batch: list[Outgoing]) -> None:
        for item in batch:  # a Batch is its messages, in order
            self.items.extend(item.messages if isinstance(item, Batch) else [item])

    def write_now(self, item: Outgoing) -> bool:
        self.items.extend(item.messages if isinstance(item, Batch) else [item])
        return True

    def offsets(self, channel: str) -> list[int]:
        return [i.offset for i in self.items if isinstance(i, Publication) and i.channel == channel]


class SlowHistory:
    """A broker whose history reads are slow, to widen the join race."""

    def __init__(self, broker: Broker) -> None:
        self._broker = broker

    def __getattr__(self, name: str) -> Any:
        return getattr(self._broker, name)

    async def history(
        self, channel: str, *, since: StreamPosition | None = None, limit: int | None = None
    ) -> HistoryPage:
        await asyncio.sleep(0.002)
        return await self._broker.history(channel, since=since, limit=limit)


def count_history_reads(broker: Any) -> list[StreamPosition | None]:
    """The ``since`` of every history read of ``broker`` from now on (the real reads,
    counted)."""
    reads: list[StreamPosition | None] = []
    original = broker.history

    async def counted(
        channel: str, *, since: StreamPosition | None = None, limit: int | None = None
    ) -> HistoryPage:
        reads.append(since)
        page: HistoryPage = await original(channel, since=since, limit=limit)
        return page

    broker.history = counted
    return reads


@pytest.fixture
async def hub() -> AsyncIterator[Hub]:
    backend = create_backend("memory://", BrokerOptions(history_size=1000))
    backend = dataclasses.replace(backend, broker=SlowHistory(backend.broker))
    # Presence on "chat:*" only: a subscribe there adds an entry first (an await), then
    # reads history unless the hub relays the channel; elsewhere a channel the hub
    # already relays is joined from where it is, at once.
    hub = Hub(backend, presence_enabled=lambda c: c.startswith("chat:"))
    await hub.start()
    yield hub
    await hub.close()


def new_session(max_queue_bytes: int = 10_000_000) -> tuple[Session, Recorder, asyncio.Task[bool]]:
    recorder = Recorder()
    session = Session(
        recorder, user="u", info={}, max_queue_bytes=max_queue_bytes, transport_name="test"
    )
    return session, recorder, asyncio.create_task(session.run_writer())


@pytest.mark.parametrize(
    "channel", ["c", "chat:c"], ids=["joined-where-it-is", "joined-after-its-presence-entry"]
)
async def test_sessions_joining_during_a_burst_get_each_offset_once_in_order(
    hub: Hub, channel: str
) -> None:
    async def publish_all() -> None:
        for i in range(600):
            await hub.publish(channel, b"%d" % i)
            if i % 5 == 0:
                await asyncio.sleep(0.001)  # spread the burst over the joins

    publisher = asyncio.create_task(publish_all())
    joined: list[tuple[Recorder, SubscribeResult]] = []
    writers = []
    while not publisher.done():
        session, recorder, writer = new_session()
        writers.append(writer)
        joined.append((recorder, await hub.subscribe(session, channel)))
        await asyncio.sleep(0)  # a subscribe that needs no broker call does not suspend
    await publisher
    for recorder, result in joined:
        expected = list(range(result.position.offset + 1, 601))

        def caught_up(r: Recorder = recorder, e: list[int] = expected) -> bool | None:
            return r.offsets(channel) == e or None

        await eventually(caught_up, timeout=5)
    assert len(joined) > 5
    for writer in writers:
        writer.cancel()


class GatedPresence:
    """A presence store whose ``add`` for one client waits until ``gate`` is set."""

    def __init__(self, store: Any, held: str) -> None:
        self._store, self.held = store, held
        self.waiting, self.gate = asyncio.Event(), asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def add(self, channel: str, client_id: str, entry: bytes) -> bool:
        if client_id == self.held:
            self.waiting.set()
            await self.gate.wait()
        return bool(await self._store.add(channel, client_id, entry))


async def test_a_join_of_a_relayed_room_gets_the_joins_that_came_while_it_joined() -> None:
    """A join of a room the hub relays (joined from where the hub is once its entry is
    in) still gets the presence events that arrived while its entry was being added,
    after its reply, as a join that reads history does."""
    backend = create_backend("memory://", BrokerOptions(history_size=100))
    first, first_recorder, first_writer = new_session()
    joining, recorder, joining_writer = new_session()
    late, _late_recorder, late_writer = new_session()
    gated = GatedPresence(backend.presence, held=joining.client_id)
    hub = Hub(dataclasses.replace(backend, presence=gated), presence_enabled=lambda c: True)
    await hub.start()
    try:
        await hub.subscribe(first, "room")
        await hub.publish("room", b"1")
        subscribing = asyncio.create_task(hub.subscribe(joining, "room"))
        await gated.waiting.wait()
        await hub.subscribe(late, "room")  # joined and announced while the other waits

        def joins(r: Recorder) -> list[bytes]:
            return [i.client for i in r.items if isinstance(i, PresenceEvent)]

        await eventually(lambda: len(joins(first_recorder)) == 1)  # the late one's
        gated.gate.set()
        result = await subscribing
        assert result.position.offset == 1
        await eventually(lambda: len(joins(recorder)) == 2)  # the late one's, then its own
        assert [late.client_id.encode() in c for c in joins(recorder)] == [True, False]
    finally:
        for writer in (first_writer, joining_writer, late_writer):
            writer.cancel()
        await hub.close()


async def test_recovery_from_since_replays_history_then_live_without_duplicates(hub: Hub) -> None:
    first = [await hub.publish("c", b"%d" % i) for i in range(20)]
    epoch = first[0].epoch

    async def publish_more() -> None:
        for i in range(200):
            await hub.publish("c", b"%d" % i)
            await asyncio.sleep(0)

    publisher = asyncio.create_task(publish_more())
    session, recorder, writer = new_session()
    replies: list[SubscribeResult] = []
    result = await hub.subscribe(session, "c", StreamPosition(7, epoch), on_ready=replies.append)
    await publisher
    assert result.recovered and replies == [result]
    await eventually(lambda: recorder.offsets("c") == list(range(8, 221)))
    writer.cancel()


async def test_a_lost_position_is_not_recovered(hub: Hub) -> None:
    await hub.publish("c", b"1")
    session, recorder, writer = new_session()
    result = await hub.subscribe(session, "c", StreamPosition(1, "another-epoch"))
    assert not result.recovered
    await hub.publish("c", b"2")
    await eventually(lambda: recorder.offsets("c") == [2])
    writer.cancel()


async def test_one_broker_subscription_per_channel_however_many_sessions(hub: Hub) -> None:
    sessions = [new_session() for _ in range(20)]
    for session, _, _ in sessions:
        await hub.subscribe(session, "shared")
    assert hub.channel_count == 1 and hub.local_subscribers("shared") == 20
    for session, _, writer in sessions:
        await hub.unregister(session)
        writer.cancel()
    assert hub.channel_count == 0
    assert not await hub.has_subscribers("shared")


async def test_a_publication_is_one_object_for_all_subscribers(hub: Hub) -> None:
    """The same object reaches every session, so what the gateway encodes for it is
    encoded once (gateway.wire caches on it: tests/test_wire.py)."""
    sessions = [new_session() for _ in range(5)]
    for session, _, _ in sessions:
        await hub.subscribe(session, "c")
    await hub.publish("c", b'{"x":1}')
    await eventually(lambda: all(r.offsets("c") == [1] for _, r, _ in sessions))
    delivered = [r.items[0] for _, r, _ in sessions]
    assert all(item is delivered[0] for item in delivered)
    for _, _, writer in sessions:
        writer.cancel()


async def test_a_full_queue_closes_only_that_session(hub: Hub) -> None:
    blocked = asyncio.Event()

    class Stuck:
        async def write(self, batch: list[Outgoing]) -> None:
            blocked.set()
            await asyncio.Future()  # never completes: a client that stopped reading

        def write_now(self, item: Outgoing) -> bool:
            return False  # the socket is full

    slow = Session(Stuck(), user="s", info={}, max_queue_bytes=2000, transport_name="test")
    slow_writer = asyncio.create_task(slow.run_writer())
    fast, recorder, fast_writer = new_session()
    await hub.subscribe(slow, "c")
    await hub.subscribe(fast, "c")
    for i in range(100):
        await hub.publish("c", b'"%s"' % (b"x" * 100))
        if i == 0:
            await blocked.wait()
    await eventually(lambda: slow.close_reason is not None)  # the fan-out runs once per pass
    assert slow.close_reason is Ending.SLOW_CONSUMER and slow.queued_bytes == 0
    assert await asyncio.wait_for(slow_writer, 5) is True  # its stuck write was abandoned
    await eventually(lambda: len(recorder.offsets("c")) == 100)
    fast_writer.cancel()


async def test_epoch_change_gives_live_sessions_a_gap_first(hub: Hub) -> None:
    session, recorder, writer = new_session()
    await hub.subscribe(session, "c")
    await hub.publish("c", b"1")
    await eventually(lambda: recorder.offsets("c") == [1])
    hub._on_message(Publication("c", 1, "new-epoch", b"2"))
    await eventually(lambda: len(recorder.items) == 3)
    assert recorder.items[1] == Gap("c", StreamPosition(0, "new-epoch"))
    assert isinstance(recorder.items[2], Publication) and recorder.items[2].epoch == "new-epoch"
    writer.cancel()


async def test_hubs_on_one_memory_namespace_are_workers_of_one_cluster() -> None:
    """``memory://<name>``: the hubs of a process created with one name share offsets and
    fan-out, as the workers of one Redis do."""
    url = f"memory://hub-test-{secrets.token_hex(4)}"
    hubs = [Hub(create_backend(url, BrokerOptions()), presence_enabled=lambda c: False)]
    hubs.append(Hub(create_backend(url, BrokerOptions()), presence_enabled=lambda c: False))
    for worker in hubs:
        await worker.start()
    sessions = [new_session() for _ in hubs]
    try:
        for worker, (session, _, _) in zip(hubs, sessions, strict=True):
            await worker.subscribe(session, "c")
        first = await hubs[0].publish("c", b"1")
        second = await hubs[1].publish("c", b"2")
        assert (first.offset, second.offset, second.epoch) == (1, 2, first.epoch)
        for _, recorder, _ in sessions:

            def got_both(r: Recorder = recorder) -> bool:
                return r.offsets("c") == [1, 2]

            await eventually(got_both)
        assert [p.offset for p in (await hubs[1].history("c")).publications] == [1, 2]
    finally:
        for worker in hubs:
            await worker.close()
        for _, _, writer in sessions:
            writer.cancel()


async def test_hubs_on_private_memory_namespaces_share_nothing(hub: Hub) -> None:
    other = Hub(create_backend("memory://", BrokerOptions()), presence_enabled=lambda c: False)
    await other.start()
    session, recorder, writer = new_session()
    try:
        await hub.subscribe(session, "c")
        mine = await other.publish("c", b"elsewhere")
        assert not await other.has_subscribers("c")  # the hub's subscription is not its
        marker = await hub.publish("c", b"here")
        assert (mine.offset, marker.offset) == (1, 1) and mine.epoch != marker.epoch
        await eventually(lambda: recorder.offsets("c") == [1])
        assert [i.data for i in recorder.items if isinstance(i, Publication)] == [b"here"]
    finally:
        await other.close()
        writer.cancel()


async def test_a_channel_the_hub_relays_is_joined_from_where_it_is_with_no_broker_call(
    hub: Hub,
) -> None:
    """Reconnect storms: a worker that already relays a channel has seen every publication
    of it in order, so a new subscriber starts from there, without a history read."""
    reads = count_history_reads(hub._broker)
    first, first_seen, w1 = new_session()
    await hub.subscribe(first, "c")
    assert len(reads) == 1
    top = (await hub.publish("c", b"1")).position
    await eventually(lambda: first_seen.offsets("c") == [1])

    fresh, fresh_seen, w2 = new_session()
    result = await hub.subscribe(fresh, "c")
    assert (result.position, result.recovered) == (top, False)
    back, back_seen, w3 = new_session()
    result = await hub.subscribe(back, "c", since=top)  # a reconnect at the top
    assert (result.position, result.recovered) == (top, True)
    assert len(reads) == 1  # neither read history
    await hub.publish("c", b"2")
    for seen in (first_seen, fresh_seen, back_seen):
        await eventually(lambda s=seen: s.offsets("c")[-1:] == [2])  # type: ignore[misc]
    assert fresh_seen.offsets("c") == back_seen.offsets("c") == [2]

    behind, behind_seen, w4 = new_session()
    await hub.subscribe(behind, "c", since=StreamPosition(0, top.epoch))
    assert reads[1:] == [StreamPosition(0, top.epoch)]  # what it missed comes from history
    await eventually(lambda: behind_seen.offsets("c") == [1, 2])
    for writer in (w1, w2, w3, w4):
        writer.cancel()


async def test_a_subscriber_resuming_from_just_behind_gets_what_the_worker_relayed() -> None:
    """Reconnect storms again: the last ``recent_size`` publications a worker relayed
    cover a client that was a few behind; further back, or in another epoch, history
    answers as before."""
    backend = create_backend("memory://", BrokerOptions(history_size=1000))
    reads = count_history_reads(backend.broker)
    hub = Hub(backend, presence_enabled=lambda c: False, recent_size=3)
    await hub.start()
    writers = []
    try:
        first, first_seen, writer = new_session()
        writers.append(writer)
        await hub.subscribe(first, "c")
        for n in range(1, 6):
            top = (await hub.publish("c", str(n).encode())).position
        await eventually(lambda: first_seen.offsets("c") == [1, 2, 3, 4, 5])
        reads.clear()

        back, back_seen, writer = new_session()
        writers.append(writer)
        result = hub.subscribe_now(back, "c", since=StreamPosition(2, top.epoch))
        assert result is not None and (result.position, result.recovered) == (top, True)
        await eventually(lambda: back_seen.offsets("c") == [3, 4, 5])
        assert reads == []  # from the worker's own: no history read

        far, far_seen, writer = new_session()
        writers.append(writer)
        assert hub.subscribe_now(far, "c", since=StreamPosition(1, top.epoch)) is None
        result = await hub.subscribe(far, "c", since=StreamPosition(1, top.epoch))
        assert result.recovered and reads == [StreamPosition(1, top.epoch)]
        await eventually(lambda: far_seen.offsets("c") == [2, 3, 4, 5])

        other, other_seen, writer = new_session()
        writers.append(writer)
        assert hub.subscribe_now(other, "c", since=StreamPosition(4, "another")) is None
        result = await hub.subscribe(other, "c", since=StreamPosition(4, "another"))
        assert not result.recovered

        await hub.publish("c", b"6")
        for seen in (first_seen, back_seen, far_seen, other_seen):
            await eventually(lambda s=seen: s.offsets("c")[-1:] == [6])  # type: ignore[misc]
        assert back_seen.offsets("c") == [3, 4, 5, 6]  # each once, in order
    finally:
        for writer in writers:
            writer.cancel()
        await hub.close()


def test_what_a_channel_keeps_of_what_it_relayed_never_has_a_hole() -> None:
    from channels.local import LocalChannel

    lc = LocalChannel("c")

    def relay(offset: int, epoch: str = "e") -> None:
        lc.epoch, lc.offset = epoch, offset
        lc.remember(Publication("c", offset, epoch, b"1"), 3)

    def offsets(since: int, epoch: str = "e") -> list[int] | None:
        kept = lc.relayed_since(StreamPosition(since, epoch))
        return None if kept is None else [p.offset for p in kept]

    assert offsets(0) is None  # nothing kept yet
    for offset in (1, 2, 3, 4):
        relay(offset)
    assert (offsets(1), offsets(2), offsets(3)) == ([2, 3, 4], [3, 4], [4])
    assert offsets(0) is None and offsets(4) is None  # too far back; nothing missed
    assert offsets(2, "other") is None
    relay(6)  # a hole (what recovery fills goes through remember in order): start over
    assert offsets(4) is None and offsets(5) == [6]
    relay(1, "new")  # a new epoch: start over
    assert offsets(5) is None and offsets(0, "new") == [1]
    lc.offset = 7  # the position moved without a publication kept (a subscriber's start)
    assert offsets(0, "new") is None


async def test_a_storm_of_resumes_reads_history_once_per_channel() -> None:
    """Every subscriber of a channel left the worker (their connections were cut) and
    they all come back at once: the first reads history, the others wait for it and
    resume from what it brought, each with every publication it missed, once."""
    backend = create_backend("memory://", BrokerOptions(history_size=1000))
    slow = SlowHistory(backend.broker)
    reads = count_history_reads(slow)
    hub = Hub(
        dataclasses.replace(backend, broker=slow), presence_enabled=lambda c: False, recent_size=50
    )
    await hub.start()
    writers = []
    try:
        gone, gone_seen, writer = new_session()
        writers.append(writer)
        await hub.subscribe(gone, "c")
        for n in range(1, 4):
            last = (await hub.publish("c", str(n).encode())).position
        await eventually(lambda: gone_seen.offsets("c") == [1, 2, 3])
        await hub.unregister(gone)  # the worker no longer relays "c"
        for n in range(4, 7):
            top = (await hub.publish("c", str(n).encode())).position
        reads.clear()

        back = [new_session() for _ in range(10)]
        writers.extend(writer for _, _, writer in back)
        results = await asyncio.gather(
            *(hub.subscribe(session, "c", since=last) for session, _, _ in back)
        )
        assert all((r.position, r.recovered) == (top, True) for r in results)
        assert reads == [last]  # one read, for the first back
        for _, seen, _ in back:
            await eventually(lambda s=seen: s.offsets("c") == [4, 5, 6])  # type: ignore[misc]
        await hub.publish("c", b"7")
        for _, seen, _ in back:
            await eventually(lambda s=seen: s.offsets("c") == [4, 5, 6, 7])  # type: ignore[misc]
    finally:
        for writer in writers:
            writer.cancel()
        await hub.close()


@contextlib.asynccontextmanager
async def relaying(count: int, data: bytes) -> AsyncIterator[tuple[Hub, StreamPosition, Recorder]]:
    """A hub relaying channel "c" (keeping its last 100) to one subscriber, after ``count``
    publications of ``data``: the hub, the last one's position, what the subscriber saw."""
    hub = Hub(create_backend("memory://", BrokerOptions()), presence_enabled=lambda c: False,
              recent_size=100)  # fmt: skip
    await hub.start()
    first, seen, writer = new_session()
    try:
        await hub.subscribe(first, "c")
        for _ in range(count):
            top = (await hub.publish("c", data)).position
        await eventually(lambda: len(seen.offsets("c")) == count)
        yield hub, top, seen
    finally:
        writer.cancel()
        await hub.close()


class Writes(Recorder):
    """A transport that keeps every item it is handed, as handed."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[Outgoing] = []

    def write_now(self, item: Outgoing) -> bool:
        self.calls.append(item)
        return super().write_now(item)


def resuming() -> tuple[Session, Writes]:
    writes = Writes()
    session = Session(writes, user="u", info={}, max_queue_bytes=10**7, transport_name="t")
    return session, writes


async def test_a_recovery_is_one_write_and_a_large_one_is_cut_into_bounded_batches() -> None:
    """Recovered publications go out batched: ten small ones in one socket write; large
    ones in items of about ``REPLAY_BATCH_BYTES``, so that a full socket makes the rest
    queue (and count towards the session's bound) instead of one huge write."""
    from channels.session import REPLAY_BATCH_BYTES

    async with relaying(10, b'"small"') as (hub, last, first_seen):
        small, small_writes = resuming()
        assert hub.subscribe_now(small, "c", since=StreamPosition(0, last.epoch)) is not None
        assert small_writes.offsets("c") == list(range(1, 11))
        assert len(small_writes.calls) == 1  # one Batch

        pad = b'"' + b"x" * (REPLAY_BATCH_BYTES * 6 // 10) + b'"'
        for _ in range(5):
            await hub.publish("c", pad)
        await eventually(lambda: len(first_seen.offsets("c")) == 15)
        large, large_writes = resuming()
        assert hub.subscribe_now(large, "c", since=last) is not None
        assert large_writes.offsets("c") == list(range(11, 16))
        assert [len(getattr(item, "messages", [item])) for item in large_writes.calls] == [2, 2, 1]


async def test_sessions_resuming_from_one_position_are_pushed_the_same_replay() -> None:
    """A reconnect storm's clients mostly resume from the same publication: the replay
    is cut into batches once and each of them is pushed the same objects (each encoded
    once for all of them); a resume from elsewhere gets its own, and once the channel
    moves on, a resume from the first position gets the new publication too."""
    async with relaying(5, b"1") as (hub, top, first_seen):
        since = StreamPosition(2, top.epoch)
        before = hub.stats.deliveries
        resumed = [resuming() for _ in range(3)]
        for session, _ in resumed:
            assert hub.subscribe_now(session, "c", since=since) is not None
        assert hub.stats.deliveries - before == 3 * 3
        items = [writes.calls for _, writes in resumed]
        assert all(writes.offsets("c") == [3, 4, 5] for _, writes in resumed)
        assert len(items[0]) == 1 and all(calls[0] is items[0][0] for calls in items)

        elsewhere, elsewhere_writes = resuming()
        assert hub.subscribe_now(elsewhere, "c", since=StreamPosition(3, top.epoch)) is not None
        assert elsewhere_writes.offsets("c") == [4, 5]
        assert elsewhere_writes.calls[0] is not items[0][0]

        await hub.publish("c", b"1")
        await eventually(lambda: len(first_seen.offsets("c")) == 6)
        assert hub._channels["c"]._replays is None  # what was made for offset 5: dropped
        later, later_writes = resuming()
        assert hub.subscribe_now(later, "c", since=since) is not None
        assert later_writes.offsets("c") == [3, 4, 5, 6]
        assert all(writes.offsets("c") == [3, 4, 5, 6] for _, writes in resumed)  # live


def test_client_ids_are_random_and_not_a_forked_parents() -> None:
    """Ids come from a buffer of the kernel's random bytes: each one distinct (past a
    refill of the buffer), 8 bytes in hex, and a child forked mid-buffer does not
    repeat its parent's next ids."""
    import os

    from channels.session import new_client_id

    ids = [new_client_id() for _ in range(1500)]  # the buffer refilled twice
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 18 and i.startswith("c-") and int(i[2:], 16) >= 0 for i in ids)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent
        os.write(write, " ".join(new_client_id() for _ in range(5)).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child = os.read(read, 1000).decode().split()
    os.close(read)
    parent = [new_client_id() for _ in range(5)]
    assert len(child) == 5 and not set(child) & set(parent)


def test_a_channel_whose_hole_is_lost_goes_on_from_the_first_thing_its_gap_precedes() -> None:
    """The position a gap carries (an SSE stream's cursor from the gap on): the new
    epoch's start when it was read whole, else just before the first publication that
    arrived while history was read, or the stream's top when none had."""
    top = StreamPosition(40, "e1")
    lost = HistoryPage([], top, complete=False)
    whole = HistoryPage([Publication("c", 1, "e2", b"1")], StreamPosition(1, "e2"))
    partial = HistoryPage([], StreamPosition(9, "e2"), complete=False)

    def pub(offset: int, epoch: str = "e1") -> Publication:
        return Publication("c", offset, epoch, b"x")

    assert gone_on_from(lost, whole, [pub(38)]) == StreamPosition(0, "e2")
    assert gone_on_from(lost, partial, []) == top
    assert gone_on_from(lost, None, []) == top
    assert gone_on_from(lost, None, [pub(38), pub(39)]) == StreamPosition(37, "e1")
    assert gone_on_from(lost, None, [pub(41), pub(42)]) == top
    assert gone_on_from(lost, None, [pub(3, "e0"), pub(40)]) == StreamPosition(39, "e1")


@pytest.mark.parametrize("resuming", [False, True], ids=["history-read", "joined-where-it-is"])
async def test_a_subscribe_whose_reply_fails_leaves_and_lets_the_channels_other_joiners_go(
    resuming: bool,
) -> None:
    """The first subscriber back to a channel reads history and the others wait for it
    (a storm's one read). If its ``on_ready`` raises (its reply could not be written),
    it leaves the channel again and the others join: they waited on it for good, a
    subscribe never answered, and it stayed half subscribed ("already subscribed", no
    publications)."""
    backend = create_backend("memory://", BrokerOptions(history_size=1000))
    hub = Hub(dataclasses.replace(backend, broker=SlowHistory(backend.broker)),
              presence_enabled=lambda c: c.startswith("chat:"), recent_size=50)  # fmt: skip
    await hub.start()
    sessions = [new_session() for _ in range(3)]
    try:
        top = (await hub.publish("c", b"1")).position
        since = top if resuming else None

        def fail(result: SubscribeResult) -> None:
            raise RuntimeError("the reply could not be encoded")

        (first, first_seen, _), *others = sessions
        failing = asyncio.create_task(hub.subscribe(first, "c", since, on_ready=fail))
        joining = [asyncio.create_task(hub.subscribe(s, "c", since)) for s, _, _ in others]
        with pytest.raises(RuntimeError):
            await failing
        results = await asyncio.wait_for(asyncio.gather(*joining), 5)
        assert all(r.position == top for r in results)
        assert "c" not in first.channels and hub.local_subscribers("c") == 2
        await hub.publish("c", b"2")
        for _, seen, _ in others:
            await eventually(lambda s=seen: s.offsets("c")[-1:] == [2])  # type: ignore[misc]
        # The session that failed is not subscribed, and may subscribe again.
        assert first_seen.offsets("c") == []
        again = await hub.subscribe(first, "c")
        assert again.position.offset == 2 and hub.local_subscribers("c") == 3
    finally:
        for _, _, writer in sessions:
            writer.cancel()
        await hub.close()
