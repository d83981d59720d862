"""The ``PresenceStore`` contract, run unchanged over every backend (tests/contract.py):
entries that expire unless refreshed, and one ``leave`` per lapsed entry for the cluster."""

from __future__ import annotations

import asyncio
import time

from tests.conftest import eventually
from tests.contract import MakeWorker

KEPT = b'{"client":"c-2","user":"kept","info":{}}'
GONE = b'{"client":"c-1","user":"gone","info":{}}'


async def test_presence_entries_are_added_listed_and_removed(make_worker: MakeWorker) -> None:
    presence = (await make_worker()).presence
    assert await presence.add("chat:x", "c-1", b'{"client":"c-1"}') is True
    assert await presence.add("chat:x", "c-2", b'{"client":"c-2"}') is True
    # A refresh, not a duplicate: False says the entry was there.
    assert await presence.add("chat:x", "c-2", b'{"client":"c-2"}') is False
    assert sorted(await presence.list("chat:x")) == [b'{"client":"c-1"}', b'{"client":"c-2"}']
    await presence.remove("chat:x", "c-1")
    assert await presence.list("chat:x") == [b'{"client":"c-2"}']
    assert await presence.list("chat:empty") == []


async def test_entries_are_shared_by_every_worker(make_worker: MakeWorker) -> None:
    here, there = await make_worker(), await make_worker()
    await here.presence.add("chat:x", "c-1", b'{"client":"c-1"}')
    assert await there.presence.list("chat:x") == [b'{"client":"c-1"}']
    assert await there.presence.add("chat:x", "c-1", b'{"client":"c-1"}') is False
    await there.presence.remove("chat:x", "c-1")
    assert await here.presence.list("chat:x") == []


async def test_presence_and_join_events_are_per_channel(make_worker: MakeWorker) -> None:
    worker = await make_worker()
    await worker.broker.subscribe("chat:a")
    await worker.presence.add("chat:a", "c-1", b'{"client":"c-1"}')
    await worker.broker.publish_event("chat:b", "join", b'{"client":"c-2"}')
    await worker.broker.publish_event("chat:a", "leave", b'{"client":"c-1"}')
    events = await eventually(worker.received.events)
    assert [(e.channel, e.event, e.client) for e in events] == [
        ("chat:a", "leave", b'{"client":"c-1"}')
    ]
    assert await worker.presence.list("chat:b") == []


async def test_a_leave_removes_the_entry_and_is_announced_once(make_worker: MakeWorker) -> None:
    """``leave`` drops the entry and fans out its ``leave`` in one step; a second leave of
    the same client, or a leave of one never there, announces nothing."""
    worker = await make_worker()
    await worker.broker.subscribe("chat:x")
    await worker.presence.add("chat:x", "c-1", GONE)
    await worker.presence.add("chat:x", "c-2", KEPT)
    await worker.presence.leave("chat:x", "c-1")
    assert await worker.presence.list("chat:x") == [KEPT]
    await worker.presence.leave("chat:x", "c-1")
    await worker.presence.leave("chat:x", "c-3")
    await worker.broker.publish("chat:x", b"1")  # a marker: everything published before it arrived
    await eventually(lambda: worker.received.publications("chat:x"))
    assert [(m.channel, m.event, m.client) for m in worker.received.events()] == [
        ("chat:x", "leave", GONE)
    ]
    await worker.presence.remove("chat:x", "c-2")  # (a remove announces nothing)
    assert await worker.presence.list("chat:x") == []


async def test_a_leave_after_the_entry_lapsed_and_was_announced_is_not_announced_again(
    make_worker: MakeWorker,
) -> None:
    """A client whose entry lapsed (its worker out of reach for longer than the TTL) and
    whose leave went out when it was expired, then leaves: no second leave."""
    worker = await make_worker(presence_ttl=0.3)
    await worker.broker.subscribe("chat:x")
    await worker.presence.add("chat:x", "c-1", GONE)
    deadline = asyncio.get_running_loop().time() + 5
    while not worker.received.events():
        await worker.presence.add("chat:x", "c-2", KEPT)  # kept: the room's keys stay
        await worker.presence.expire("chat:x")
        assert asyncio.get_running_loop().time() < deadline, "the entry never expired"
        await asyncio.sleep(0.05)
    await worker.presence.leave("chat:x", "c-1")
    await worker.broker.publish("chat:x", b"1")  # a marker, as above
    await eventually(lambda: worker.received.publications("chat:x"))
    assert [(m.event, m.client) for m in worker.received.events()] == [("leave", GONE)]


async def test_expired_presence_entries_leave_once_with_a_leave_event(
    make_worker: MakeWorker,
) -> None:
    """A worker that died stops refreshing its clients' entries: once their TTL passed,
    whichever worker expires them first announces each ``leave``, exactly once."""
    a = await make_worker(presence_ttl=0.3)
    await a.broker.subscribe("chat:x")
    await a.presence.add("chat:x", "c-1", GONE)
    await a.presence.add("chat:x", "c-2", KEPT)
    b, c = await make_worker(presence_ttl=0.3), await make_worker(presence_ttl=0.3)
    deadline = asyncio.get_running_loop().time() + 5
    while True:  # keep c-2 refreshed (its worker is alive) until c-1 has expired
        await a.presence.add("chat:x", "c-2", KEPT)
        await asyncio.gather(b.presence.expire("chat:x"), c.presence.expire("chat:x"))
        if a.received.events():
            break
        assert asyncio.get_running_loop().time() < deadline, "the entry never expired"
        await asyncio.sleep(0.05)
    await a.broker.publish("chat:x", b"1")  # a marker: everything published before it arrived
    await eventually(lambda: a.received.publications("chat:x"))
    leaves = a.received.events()
    assert [(m.event, m.client) for m in leaves] == [("leave", GONE)]
    assert await a.presence.list("chat:x") == [KEPT]


async def test_a_lapsed_entry_is_left_out_of_the_list_which_announces_its_leave(
    make_worker: MakeWorker,
) -> None:
    watcher = await make_worker()
    await watcher.broker.subscribe("chat:x")
    lister = await make_worker(presence_ttl=0.3)
    await lister.presence.add("chat:x", "c-1", GONE)
    await lister.presence.add("chat:x", "c-2", KEPT)
    deadline = asyncio.get_running_loop().time() + 5
    while len(await lister.presence.list("chat:x")) == 2:
        await lister.presence.add("chat:x", "c-2", KEPT)  # its worker is alive
        assert asyncio.get_running_loop().time() < deadline, "the entry never lapsed"
        await asyncio.sleep(0.05)
    await lister.presence.expire("chat:x")  # nothing left to expire: no second leave
    assert await lister.presence.list("chat:x") == [KEPT]
    await watcher.broker.publish("chat:x", b"1")  # a marker, as above
    await eventually(lambda: watcher.received.publications("chat:x"))
    assert [(m.event, m.client) for m in watcher.received.events()] == [("leave", GONE)]
    # Gone for good: adding it again is a new entry (its worker announces a join).
    assert await lister.presence.add("chat:x", "c-1", GONE) is True


async def test_presence_of_a_worker_that_stops_refreshing_expires_within_the_ttl(
    make_worker: MakeWorker,
) -> None:
    dead = await make_worker(presence_ttl=0.5)
    alive = await make_worker(presence_ttl=0.5)
    # Timed from before the entry is added: a busy machine only makes it look later.
    started = time.monotonic()
    await dead.presence.add("chat:x", "c-dead", b'{"client":"c-dead"}')
    await alive.presence.add("chat:x", "c-alive", b'{"client":"c-alive"}')
    assert len(await alive.presence.list("chat:x")) == 2
    while len(await alive.presence.list("chat:x")) == 2:
        await alive.presence.add("chat:x", "c-alive", b'{"client":"c-alive"}')  # refresh
        assert time.monotonic() - started < 3, "stale presence entry did not expire"
        await asyncio.sleep(0.05)
    assert time.monotonic() - started >= 0.45  # not before its TTL (less clock rounding)
    assert await alive.presence.list("chat:x") == [b'{"client":"c-alive"}']
