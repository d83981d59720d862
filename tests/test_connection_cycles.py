"""A closed connection is freed by reference counting, not left to the garbage collector.

Objects in a reference cycle wait for a collection of their generation; those that lived
through a few younger collections first (a connection lives for seconds) wait for a full
one, which CPython runs rarely. After a reconnect storm the dead connections of thousands
of clients then stayed in memory as cycles (1,224 HTTP protocols, 19,000 objects in all
on one worker, 2 s after 1,667 clients came back), and the allocator's pools they held
kept the worker's memory above its idle level after the collection freed them.

Real clients against the in-process server, the collector off meanwhile; then one
collection that keeps what it finds (``DEBUG_SAVEALL``): none of the gateway's
per-connection objects may be among it.
"""

from __future__ import annotations

import contextlib
import gc
from collections import Counter
from collections.abc import Iterator

import pytest

from channels.session import Session
from gateway.server.cycle import DetachableCycle, RawBody
from gateway.server.front_stream import FrontStream
from gateway.server.http import GatewayHttpToolsProtocol
from gateway.server.upgraded import UpgradedWebSocket
from gateway.sse import SSETransport
from gateway.ws import Connection, WebSocketTransport
from tests.conftest import MakeServer, RunningServer, eventually
from tests.fake_backend import FakeBackend
from tests.helpers import api_client, api_publish, open_sse, ws_client

pytestmark = pytest.mark.gateway_protocols  # what these tests are about

PER_CONNECTION = (
    GatewayHttpToolsProtocol,
    UpgradedWebSocket,
    Connection,
    WebSocketTransport,
    SSETransport,
    Session,
    DetachableCycle,
    RawBody,
    FrontStream,
)
ROUNDS = 5


@contextlib.contextmanager
def collector_off() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def cycles_left() -> Counter[str]:
    """The per-connection objects that only a collection would free (collected now)."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        return Counter(type(o).__name__ for o in gc.garbage if isinstance(o, PER_CONNECTION))
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


async def settled(server: RunningServer, remaining: int = 0) -> None:
    """Every session but ``remaining`` forgotten, and every connection but theirs closed
    on the server's side."""
    hub = server.gateway.hub
    state = server.server.server_state
    await eventually(lambda: len(hub.sessions) == len(state.connections) == remaining)


async def websocket_rounds(server: RunningServer, channel: str) -> None:
    for n in range(ROUNDS):
        async with ws_client(server) as ws:
            await ws.subscribe(channel)
            await ws.publish(channel, {"n": n})
            [push] = await ws.publications(channel, 1)
            assert push["data"] == {"n": n}


async def sse_rounds(server: RunningServer, channel: str) -> None:
    async with api_client(server) as http:
        for n in range(ROUNDS):
            async with open_sse(http, [channel]) as stream:
                await api_publish(http, channel, {"n": n})
                [event] = await stream.publications(1)
                assert event["json"]["data"] == {"n": n}


ROUNDS_OF = {"websocket": websocket_rounds, "sse": sse_rounds}


@pytest.mark.parametrize("transport", sorted(ROUNDS_OF))
@pytest.mark.parametrize("live", [False, True], ids=["channel-joined-anew", "channel-live"])
async def test_a_closed_connection_leaves_no_cycle(
    server: RunningServer, transport: str, live: bool
) -> None:
    """Each subscribe joins the channel anew (a broker call first: the WebSocket reader's
    task, an SSE stream opened later), or one other client keeps it live (the subscribe
    answered, the stream opened, in the callback that parsed the client's frame or
    request)."""
    async with contextlib.AsyncExitStack() as stack:
        if live:
            keeper = await stack.enter_async_context(ws_client(server))
            await keeper.subscribe("cycles")
        with collector_off():
            await ROUNDS_OF[transport](server, "cycles")
            await settled(server, remaining=int(live))
            assert cycles_left() == Counter()
    await settled(server)


async def test_a_stream_left_while_it_waits_leaves_no_cycle(
    make_server: MakeServer, backend: FakeBackend
) -> None:
    """Clients that leave while the subscribe hook decides (the front door waiting for
    their streams): once it answers, nothing of them is left for the collector."""
    from tests.test_sse_shortcut import _leave_while_the_backend_decides

    server = await make_server(hooks=backend.hooks())
    with collector_off():
        for _ in range(ROUNDS):
            await _leave_while_the_backend_decides(server, backend)
        await settled(server)
        assert cycles_left() == Counter()
