"""One drain: the server runs the app's drain when it starts shutting down, before it closes
any connection, and the lifespan's end waits for that same run instead of draining again."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import pytest
from websockets.exceptions import ConnectionClosed

from gateway.server.draining import DRAIN, DrainingServer
from tests.conftest import RunningServer
from tests.helpers import ws_client


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
