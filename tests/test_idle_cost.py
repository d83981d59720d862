"""An idle connection costs no task beyond uvicorn's own, and keeps none of its frames.

Memory per idle connection is a product figure (docs/benchmarks.md); these pin
down the structural part of it. An accepted WebSocket and an opened raw SSE
stream are detached from their ASGI call (no task, no framework frames, no
scope with the token left behind). A WebSocket gets a reader task only while
commands are waiting and a writer task only when one is needed (an item must
queue, or it closes with a code); an SSE stream learns of a lost client from the
protocol rather than from a task parked on ``receive``. And nothing of either is
left once its client has gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest

from tests.conftest import RunningServer, eventually, token
from tests.helpers import (
    api_client,
    api_publish,
    client_text_frame,
    dumps,
    raw_ws_handshake,
    read_raw_frame,
    ws_client,
)
from tests.test_sse_raw import raw_sse

pytestmark = pytest.mark.gateway_protocols  # what these tests are about


def tasks_named(prefix: str) -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith(prefix) and not t.done()]


async def test_a_websocket_written_directly_has_no_writer_task(server: RunningServer) -> None:
    async with ws_client(server) as client, api_client(server) as http:
        await client.subscribe("idle")
        for n in range(5):
            await api_publish(http, "idle", {"n": n})
        assert len(await client.publications("idle", 5)) == 5
        await client.ping_ok()
        assert tasks_named("ws-writer:") == []


def asgi_calls(kind: str) -> list[asyncio.Task[object]]:
    """Running ASGI calls (uvicorn's ``run_asgi`` tasks) of ``kind``'s protocol or cycle."""
    suffix = f"{kind}.run_asgi"
    return [
        t
        for t in asyncio.all_tasks()
        if not t.done() and t.get_coro().__qualname__.endswith(suffix)  # type: ignore[union-attr]
    ]


async def test_an_accepted_websocket_keeps_no_task_while_idle(server: RunningServer) -> None:
    async with ws_client(server) as a, ws_client(server) as b, api_client(server) as http:
        await a.subscribe("detached")
        await b.subscribe("detached")
        await api_publish(http, "detached", {"n": 1})
        assert len(await a.publications("detached", 1)) == 1
        assert len(await b.publications("detached", 1)) == 1
        await a.ping_ok()
        await b.ping_ok()
        # The endpoint returned after accepting; nothing reads until a frame comes.
        await eventually(lambda: asgi_calls("WebSocketProtocol") == [] and tasks_named("ws-") == [])
        assert server.gateway.hub.local_subscribers("detached") == 2
    # A detached connection's disconnect still ends its session.
    await eventually(lambda: server.gateway.hub.local_subscribers("detached") == 0, timeout=3)


def protocols(server: RunningServer, kind: type) -> list[Any]:
    return [c for c in server.server.server_state.connections if isinstance(c, kind)]


async def test_a_websocket_upgraded_below_asgi_keeps_nothing_of_its_request(
    server: RunningServer,
) -> None:
    from gateway.server.upgraded import UpgradedWebSocket

    tok = token("forgetful")
    async with ws_client(server, tok) as client:
        await client.subscribe("forget")
        assert asgi_calls("WebSocketProtocol") == []
        (protocol,) = protocols(server, UpgradedWebSocket)
        # No framework call ever ran (no exit stacks, no route, no query string with the
        # token); the handshake was parsed by the HTTP protocol, which keeps nothing of it,
        # and the connection's protocol holds no request, scope or parser.
        held = {name: getattr(protocol, name, None) for name in UpgradedWebSocket.__slots__}
        assert tok not in repr(held)
        assert not hasattr(protocol, "__dict__")
        await client.ping_ok()  # and the connection is as alive as before


@pytest.mark.parametrize("front_door", [True, False], ids=["front-door", "uvicorn"])
async def test_a_detached_sse_stream_forgets_its_request(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch, front_door: bool
) -> None:
    """Opened by the front door, a stream's protocol holds no request at all; opened by
    uvicorn's protocol, its cycle keeps of the scope only what ``send`` reads."""
    from gateway.server.front import FrontDoor
    from gateway.server.http import GatewayHttpToolsProtocol

    if not front_door:
        monkeypatch.setattr(FrontDoor, "_stream_here", lambda *a: False)
    tok = token("forgetful-sse")
    async with raw_sse(server, ["forget-sse"], tok) as stream, api_client(server) as http:
        await stream.chunk()
        await eventually(lambda: asgi_calls("DetachableCycle") == [])
        (protocol,) = protocols(server, GatewayHttpToolsProtocol)
        if front_door:
            assert protocol.cycle is None and protocol._stream is not None
            assert tok not in repr(vars(protocol))
            assert {"url", "headers", "scope", "parser"}.isdisjoint(vars(protocol))
        else:
            scope = {"type": "http", "method": "GET", "http_version": "1.1"}
            assert protocol.cycle.scope == scope
            assert tok not in repr(vars(protocol.cycle))
            assert protocol.headers == [] and protocol.url == b""
        await api_publish(http, "forget-sse", {"still": "streaming"})
        assert b'"still":"streaming"' in await stream.chunk()


async def test_commands_arriving_together_are_handled_in_order(server: RunningServer) -> None:
    reader, writer = await raw_ws_handshake(server.port, token())
    try:
        commands = [
            {"id": 1, "op": "subscribe", "channel": "burst"},
            {"id": 2, "op": "publish", "channel": "burst", "data": "a"},
            {"id": 3, "op": "bogus"},
            {"id": 4, "op": "publish", "channel": "burst", "data": "b"},
            {"id": 5, "op": "unsubscribe", "channel": "burst"},
            {"id": 6, "op": "publish", "channel": "burst", "data": "c"},
            {"id": 7, "op": "ping"},
        ]
        # One TCP write: every frame is waiting before the first is handled.
        writer.write(b"".join(client_text_frame(dumps(c).encode()) for c in commands))
        replies: list[tuple[int, bool]] = []
        while len(replies) < len(commands):
            frame = await read_raw_frame(reader)
            message = orjson.loads(frame[2:] if frame[1] < 126 else frame[4:])
            if "id" in message:
                replies.append((message["id"], message["ok"]))
        assert replies == [(n, n != 3) for n in range(1, 8)]
    finally:
        writer.close()


async def test_closing_with_a_code_starts_the_writer_that_sends_it(
    make_server: Callable[..., Awaitable[RunningServer]],
) -> None:
    server = await make_server()
    async with ws_client(server, token(ttl=1.5)) as client:
        await client.subscribe("expiring")
        assert tasks_named("ws-writer:") == []
        code, reason, _ = await client.expect_close(timeout=10)
        assert (code, reason) == (4001, "token expired")


async def test_a_raw_sse_stream_keeps_no_task_and_sees_its_client_leave(
    server: RunningServer,
) -> None:
    async with raw_sse(server, ["idle-sse"]) as stream, api_client(server) as http:
        await stream.chunk()
        await eventually(lambda: server.gateway.hub.local_subscribers("idle-sse") == 1)
        await api_publish(http, "idle-sse", {"n": 1})
        assert b'"n":1' in await stream.chunk()
        # The ASGI call returned once the stream was open (Stream); no writer,
        # no "sse-disconnect" watch either.
        await eventually(lambda: asgi_calls("DetachableCycle") == [] and tasks_named("sse") == [])
    # The socket closed: the protocol's connection_lost ends the session at once,
    # without waiting for a heartbeat write to fail.
    await eventually(lambda: server.gateway.hub.local_subscribers("idle-sse") == 0, timeout=3)


async def test_keepalive_pings_come_from_one_timer_per_loop(
    make_server: Callable[..., Awaitable[RunningServer]],
) -> None:
    from gateway.server.keepalive import loop_keepalive
    from gateway.server.upgraded import UpgradedWebSocket

    server = await make_server(ping_interval=0.2, ping_timeout=5)
    async with ws_client(server) as a, ws_client(server) as b:
        await a.ping_ok()
        await b.ping_ok()
        keepalive = loop_keepalive(asyncio.get_running_loop())
        assert keepalive is not None
        protocols = [p for p in keepalive.members if isinstance(p, UpgradedWebSocket)]
        assert len(protocols) == len(keepalive.members) == 2
        # No per-connection timers; pings still go out and get answered.
        assert all(not hasattr(p, "ping_timer") for p in protocols)
        await eventually(lambda: all(p.last_ping_rtt > 0 for p in protocols), timeout=5)
    await eventually(lambda: not keepalive.members)


async def test_a_crowd_that_connected_at_once_is_pinged_a_bucket_at_a_time(
    make_server: Callable[..., Awaitable[RunningServer]],
) -> None:
    """Regression: the keep-alive timer asked every connection of the loop in one pass,
    so clients that connected together (a deploy, a reconnect storm) were pinged, and
    answered, all in the same pass every interval: a pause that every publication behind
    it waited for. Now they are spread over the period, a bucket per tick."""
    from gateway.server.keepalive import loop_keepalive

    server = await make_server(ping_interval=1.0, ping_timeout=5)  # period 0.25 s: 5 buckets
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(50):
            await (await stack.enter_async_context(ws_client(server))).ping_ok()
        keepalive = loop_keepalive(asyncio.get_running_loop())
        assert keepalive is not None and len(keepalive.buckets) == 5
        members: list[Any] = keepalive.members
        assert len(members) == 50
        opened = max(m.ping_sent_at for m in members)
        await eventually(lambda: all(m.ping_sent_at > opened for m in members), timeout=5)
        by_tick: dict[float, int] = {}
        for m in members:
            by_tick[m.ping_sent_at] = by_tick.get(m.ping_sent_at, 0) + 1
        # At most a bucket (50 / 5) per tick; all at once, or in two ticks, before.
        assert max(by_tick.values()) <= 10 and len(by_tick) >= 5, by_tick


def live_instances(*kinds: type) -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, kinds))


async def test_detached_connections_leave_nothing_behind(server: RunningServer) -> None:
    from channels.session import Session
    from gateway.sse import Stream
    from gateway.ws import Connection

    kinds = (Connection, Stream, Session)
    assert live_instances(*kinds) == 0
    for _ in range(3):
        async with contextlib.AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(ws_client(server)) for _ in range(10)]
            for n, client in enumerate(clients):
                await client.subscribe(f"gone-{n % 3}")
            streams = [
                await stack.enter_async_context(raw_sse(server, [f"gone-{n % 3}"]))
                for n in range(10)
            ]
            for stream in streams:
                await stream.chunk()
            await eventually(lambda: len(server.gateway.hub.sessions) == 20)
            assert live_instances(*kinds) == 20 + 10 + 10  # a Session each, and its owner
        # Every client went away: each connection's state is gone with it.
        await eventually(lambda: len(server.gateway.hub.sessions) == 0, timeout=5)
        await eventually(lambda: live_instances(*kinds) == 0, timeout=5)
