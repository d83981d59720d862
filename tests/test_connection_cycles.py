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
from gateway.server.http import GatewayHttpToolsProtocol
from gateway.server.upgraded import UpgradedWebSocket
from gateway.sse import SSETransport
from gateway.ws import Connection, WebSocketTransport
from tests.conftest import RunningServer, eventually
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


async def all_gone(server: RunningServer) -> None:
    """Every session forgotten and every connection closed on the server's side."""
    hub = server.gateway.hub
    state = server.server.server_state
    await eventually(lambda: not hub.sessions and not state.connections)


async def test_a_closed_websocket_leaves_no_cycle(server: RunningServer) -> None:
    with collector_off():
        for n in range(ROUNDS):
            async with ws_client(server) as ws:
                await ws.subscribe("cycles")
                await ws.publish("cycles", {"n": n})
                [push] = await ws.publications("cycles", 1)
                assert push["data"] == {"n": n}
        await all_gone(server)
        assert cycles_left() == Counter()


async def test_a_closed_sse_stream_leaves_no_cycle(server: RunningServer) -> None:
    with collector_off():
        async with api_client(server) as http:
            for n in range(ROUNDS):
                async with open_sse(http, ["cycles"]) as stream:
                    await api_publish(http, "cycles", {"n": n})
                    [event] = await stream.publications(1)
                    assert event["json"]["data"] == {"n": n}
        await all_gone(server)
        assert cycles_left() == Counter()
