"""Messages that reach the hub in the same loop pass go to each subscriber as one write.

The hub fans out once per pass (``Hub._flush``): a burst of publications becomes
one ``Batch`` per session, written with one socket write. These tests pin that
down (one item, the same object for every session) and check that the wire is
unchanged: every publication is still its own WebSocket frame or SSE event, in
order, exactly once, also for a session that joins in the middle of a burst.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import orjson
import pytest

from channels.backend_url import create_backend
from channels.broker import BrokerOptions
from channels.hub import Hub
from channels.publication import Batch, Publication, StreamPosition
from channels.session import Outgoing, Session
from gateway import cursor
from gateway.wire import frame_chunk, text_frame
from tests.conftest import RunningServer, eventually, token
from tests.helpers import client_text_frame, raw_ws_handshake, read_raw_frame, ws_client
from tests.test_sse_raw import raw_sse


class Items:
    """Records what the session hands to its transport, batches left whole."""

    def __init__(self) -> None:
        self.items: list[Outgoing] = []

    async def write(self, batch: list[Outgoing]) -> None:
        self.items.extend(batch)

    def write_now(self, item: Outgoing) -> bool:
        self.items.append(item)
        return True


@pytest.fixture
async def hub() -> AsyncIterator[Hub]:
    hub = Hub(create_backend("memory://", BrokerOptions()), presence_enabled=lambda c: False)
    await hub.start()
    yield hub
    await hub.close()


def session_with(items: Items) -> tuple[Session, asyncio.Task[bool]]:
    session = Session(items, user="u", info={}, max_queue_bytes=1 << 20, transport_name="test")
    return session, asyncio.create_task(session.run_writer())


async def test_a_burst_is_one_batch_per_session_shared_by_all(hub: Hub) -> None:
    a, b = Items(), Items()
    sa, ta = session_with(a)
    sb, tb = session_with(b)
    await hub.subscribe(sa, "burst")
    await hub.subscribe(sb, "burst")
    for n in range(10):  # the memory broker never suspends: one loop pass
        await hub.publish("burst", b"%d" % n)
    await eventually(lambda: a.items and b.items)
    [batch_a], [batch_b] = a.items, b.items
    assert isinstance(batch_a, Batch) and batch_a is batch_b
    assert [m.offset for m in batch_a.messages if isinstance(m, Publication)] == list(range(1, 11))
    assert hub.stats.deliveries == 20
    # A lone publication in a later pass is not wrapped.
    await hub.publish("burst", b"10")
    await eventually(lambda: len(a.items) == 2)
    assert isinstance(a.items[1], Publication) and a.items[1].offset == 11
    for task in (ta, tb):
        task.cancel()


async def test_a_session_that_joins_during_a_pass_gets_each_offset_once(hub: Hub) -> None:
    early, late = Items(), Items()
    se, te = session_with(early)
    sl, tl = session_with(late)
    await hub.subscribe(se, "mid")
    for n in range(5):
        await hub.publish("mid", b"%d" % n)
    # Joins while offsets 1-5 wait in the pending pass: it starts after them.
    result = await hub.subscribe(sl, "mid")
    for n in range(5, 10):
        await hub.publish("mid", b"%d" % n)

    def offsets(items: Items) -> list[int]:
        out = []
        for item in items.items:
            for m in item.messages if isinstance(item, Batch) else [item]:
                assert isinstance(m, Publication)
                out.append(m.offset)
        return out

    await eventually(lambda: len(offsets(early)) == 10 and len(offsets(late)) >= 1)
    assert offsets(early) == list(range(1, 11))
    assert offsets(late) == list(range(result.position.offset + 1, 11))
    for task in (te, tl):
        task.cancel()


async def test_a_burst_reaches_websocket_clients_as_separate_exact_frames(
    server: RunningServer,
) -> None:
    reader, writer = await raw_ws_handshake(server.port, token())
    try:
        writer.write(client_text_frame(b'{"id": 1, "op": "subscribe", "channel": "wsb"}'))
        reply = orjson.loads((await read_raw_frame(reader))[2:])
        epoch = reply["result"]["epoch"]
        async with ws_client(server) as other:
            await other.subscribe("wsb")
            hub = server.gateway.hub
            for n in range(50):  # one loop pass: one Batch, one write per client
                await hub.publish("wsb", b'{"n":%d}' % n)
            for n in range(50):
                push = {"channel": "wsb", "offset": n + 1, "epoch": epoch, "data": {"n": n}}
                assert await read_raw_frame(reader) == text_frame(orjson.dumps(push))
            got = await other.publications("wsb", 50)
            assert [p["data"]["n"] for p in got] == list(range(50))
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_a_burst_reaches_sse_streams_with_every_event_and_cursor(
    make_server: Callable[..., Awaitable[RunningServer]],
) -> None:
    server = await make_server()
    hub = server.gateway.hub
    async with raw_sse(server, ["sb"]) as single, raw_sse(server, ["sb", "other"]) as multi:
        await single.chunk()
        await multi.chunk()
        for n in range(20):
            await hub.publish("sb", b"%d" % n)
        body_single = await single.chunk()
        body_multi = await multi.chunk()
    epoch = (await hub.history("sb")).position.epoch
    other_epoch = (await hub.history("other")).position.epoch
    events_single, events_multi = [], []
    for n in range(20):
        push = orjson.dumps({"channel": "sb", "offset": n + 1, "epoch": epoch, "data": n})
        position = StreamPosition(n + 1, epoch)
        one = cursor.encode({"sb": position})
        both = cursor.encode({"sb": position, "other": StreamPosition(0, other_epoch)})
        events_single.append(b"id: %s\ndata: %s\n\n" % (one.encode(), push))
        events_multi.append(b"id: %s\ndata: %s\n\n" % (both.encode(), push))
    # One chunk carries the whole burst, event after event.
    assert body_single == b"".join(events_single)
    assert body_multi == b"".join(events_multi)
    assert frame_chunk(body_single).startswith(b"%x\r\n" % len(body_single))


async def test_a_burst_through_asgi_send_keeps_every_frame_and_event(
    make_server: Callable[..., Awaitable[RunningServer]],
) -> None:
    """GATEWAY_RAW_WRITES=false: a Batch goes out as one ASGI send per message."""
    server = await make_server(raw_writes=False)
    hub = server.gateway.hub
    async with ws_client(server) as client, raw_sse(server, ["asgi-b"]) as stream:
        await client.subscribe("asgi-b")
        await stream.chunk()
        await eventually(lambda: hub.local_subscribers("asgi-b") == 2)
        for n in range(30):
            await hub.publish("asgi-b", b"%d" % n)
        got = await client.publications("asgi-b", 30)
        assert [p["data"] for p in got] == list(range(30))
        body = b""
        while body.count(b"\n\n") < 30:
            body += await stream.chunk()
    datas = [orjson.loads(line[6:])["data"] for line in body.split(b"\n") if line[:6] == b"data: "]
    assert datas == list(range(30))
