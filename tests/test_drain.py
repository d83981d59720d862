"""One drain: the server runs the app's drain when it starts shutting down, before it closes
any connection, and the lifespan's end waits for that same run instead of draining again."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from gateway.server.draining import DRAIN, DrainingServer
from tests.conftest import RunningServer
from tests.helpers import open_sse, ws_client


async def test_the_server_and_the_lifespan_share_one_drain(
    make_server: Callable[..., Awaitable[RunningServer]], caplog: pytest.LogCaptureFixture
) -> None:
    server = await make_server(server_class=DrainingServer, drain_seconds=5)
    assert server.server.lifespan.state[DRAIN] == server.gateway.drain
    with caplog.at_level(logging.INFO, logger="gateway.runtime"):
        async with ws_client(server) as client:
            await client.subscribe("news")
            server.server.should_exit = True
            with pytest.raises(ConnectionClosed) as closed:
                await client.recv(timeout=10)
        # The app's own close (with the contract's reason), not uvicorn's bare 1012.
        close = closed.value.rcvd
        assert close is not None, "no close frame"
        assert (close.code, close.reason) == (1012, "service restart")
        # The lifespan's end (its own call of the drain included) is over.
        await asyncio.wait_for(server.server.lifespan.shutdown_event.wait(), 10)
    assert caplog.text.count("draining 1 connections") == 1
    assert server.gateway.draining


async def test_streams_ended_by_the_drain_come_back_at_spread_times(
    make_server: Callable[..., Awaitable[RunningServer]],
) -> None:
    """A pod's streams all end at once, and EventSource reconnects after exactly its
    reconnection time: each stream the drain ends gets a last ``retry:`` between
    ``GATEWAY_SSE_RETRY_MS`` and three times it, at random, then its end."""
    server = await make_server(server_class=DrainingServer, drain_seconds=5, sse_retry_ms=1000)
    async with contextlib.AsyncExitStack() as stack:
        http = await stack.enter_async_context(httpx.AsyncClient(base_url=server.url))
        streams = [await stack.enter_async_context(open_sse(http, ["news"])) for _ in range(12)]
        for stream in streams:
            assert (await stream.event())["retry"] == "1000"  # the opening's
        server.server.should_exit = True
        ends = [await stream.until_end(10) for stream in streams]
    retries = []
    for blocks in ends:
        assert blocks and set(blocks[-1]) == {"retry"}, blocks  # the last block, alone
        retries.append(int(blocks[-1]["retry"]))
    assert all(1000 <= retry <= 3000 for retry in retries), retries
    assert len(set(retries)) > 1, retries  # spread (twelve equal draws: one in 10^34)
