"""One drain: the server runs the app's drain when it starts shutting down, before it closes
any connection, and the lifespan's end waits for that same run instead of draining again."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import httpx
import orjson
import pytest
from websockets.exceptions import ConnectionClosed

from gateway.server.draining import DRAIN, DrainingServer
from tests.conftest import RunningServer
from tests.helpers import (
    api_client,
    api_history,
    api_publish,
    bearer,
    open_sse,
    poll,
    small_rcvbuf_socket,
    ws_client,
)


async def test_the_server_and_the_lifespan_share_one_drain(
    make_server: Callable[..., Awaitable[RunningServer]], caplog: pytest.LogCaptureFixture
) -> None:
    server = await make_server(server_class=DrainingServer, drain_seconds=5)
    assert server.server.lifespan.state[DRAIN] == server.gateway.drain
    with caplog.at_level(logging.INFO):
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
    assert caplog.text.count("draining: closing 1 connections") == 1
    # Its end is said too, and nothing is an error (uvicorn's "timeout graceful shutdown
    # exceeded" was, with no time left it and nothing to wait for).
    assert caplog.text.count("drained: every connection closed in") == 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
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


async def test_a_streamed_publish_under_way_is_answered_before_the_shutdown_cuts_it(
    make_server: Callable[..., Awaitable[RunningServer]],
) -> None:
    """A backend still sending an NDJSON body when the pod shuts down: a second before
    the server's deadline (it cancels what still runs, and the backend got a bare close,
    not knowing how much was published) the request stops reading and answers 503 with
    what it published, so that the backend sends the rest to another pod."""
    server = await make_server(server_class=DrainingServer, drain_seconds=2)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(
        b"POST /api/publish/stream?channel=piped HTTP/1.1\r\nhost: x\r\n"
        + f"authorization: {bearer()['Authorization']}\r\n".encode()
        + b"content-type: application/x-ndjson\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    for n in (1, 2, 3):
        line = b'{"n": %d}\n' % n
        writer.write(b"%x\r\n%s\r\n" % (len(line), line))
    await writer.drain()
    async with httpx.AsyncClient(base_url=server.url) as http:
        await poll(lambda: history_size(http), timeout=10)  # the three are published
    server.server.should_exit = True  # and the body never ends
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 "), answer
    reply = orjson.loads(body)
    assert reply["published"] == 3 and reply["offset"] == 3, reply
    assert reply["error"] == {
        "code": "internal",
        "message": "the gateway is shutting down: send the rest elsewhere",
    }


async def history_size(http: httpx.AsyncClient) -> bool:
    return len((await api_history(http, "piped"))["publications"]) == 3


async def test_a_drain_that_used_its_whole_budget_is_no_error(
    make_server: Callable[..., Awaitable[RunningServer]], caplog: pytest.LogCaptureFixture
) -> None:
    """A client that stopped reading holds the drain to its deadline (its 1012 waits
    behind what is queued for it); uvicorn was then left no time at all and logged an
    error ("Cancel 0 running task(s), timeout graceful shutdown exceeded") with nothing
    to wait for."""
    server = await make_server(
        server_class=DrainingServer, drain_seconds=1, client_queue_bytes=64 << 20
    )
    sock = small_rcvbuf_socket(server.port)
    with caplog.at_level(logging.INFO):
        async with ws_client(server, sock=sock, max_queue=1, compression=None) as stuck:
            await stuck.subscribe("news")
            async with api_client(server) as http:  # more than the socket's buffers take
                for i in range(150):
                    await api_publish(http, "news", {"i": i, "pad": "x" * 60_000})
            server.server.should_exit = True
            await asyncio.wait_for(server.server.lifespan.shutdown_event.wait(), 10)
    assert "1 connections still open after the drain" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
