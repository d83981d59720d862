"""Backpressure: a client that stops reading is cut off (4008 / stream ended) without
slowing the others or making the server's memory grow."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import RunningServer, eventually, token
from tests.helpers import (
    WsClient,
    api_client,
    parse_sse,
    sample_value,
    small_rcvbuf_socket,
    sse_params,
    ws_client,
)

QUEUE_BYTES = 65536
MESSAGES = 2000
PAD = "x" * 4000  # ~4 KB per publication


def _sessions_of(server: RunningServer, user: str) -> list[Any]:
    return [s for s in server.gateway.hub.sessions if getattr(s, "user", None) == user]


async def _publish_many(
    http: httpx.AsyncClient, channel: str, count: int, workers: int = 8, pad: str = PAD
) -> dict[int, int]:
    """Publish ``count`` messages over the HTTP API; returns data index -> offset.

    The readers that must keep up run in this test's event loop, beside the server and
    the publishers: tests that need them to keep up publish with fewer ``workers``.
    """
    indices = iter(range(count))
    offsets: dict[int, int] = {}
    headers = {"Authorization": f"Bearer {token('backend')}"}

    async def worker() -> None:
        for i in indices:
            r = await http.post(
                "/api/publish",
                json={"channel": channel, "data": {"i": i, "pad": pad}},
                headers=headers,
            )
            assert r.status_code == 200, r.text
            offsets[i] = r.json()["offset"]

    await asyncio.gather(*(worker() for _ in range(workers)))
    return offsets


class QueueWatch:
    """Samples the largest outbound queue of any session while the test runs."""

    def __init__(self, server: RunningServer) -> None:
        self.server = server
        self.max_bytes = 0
        self.samples = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            for s in list(self.server.gateway.hub.sessions):
                self.max_bytes = max(self.max_bytes, int(getattr(s, "queued_bytes", 0)))
            self.samples += 1
            await asyncio.sleep(0.005)

    async def __aenter__(self) -> QueueWatch:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def _assert_in_order_prefix(offsets: list[int]) -> None:
    assert offsets == list(range(1, len(offsets) + 1)), offsets[:20]


async def test_slow_ws_consumer_is_closed_with_4008_while_fast_readers_get_everything(make_server):
    server = await make_server(client_queue_bytes=QUEUE_BYTES)
    sock = small_rcvbuf_socket(server.port)
    async with (
        api_client(server) as http,
        ws_client(server, token("slow"), sock=sock, max_queue=1, compression=None) as slow,
        ws_client(server, token("fast1"), compression=None) as r1,
        ws_client(server, token("fast2"), compression=None) as r2,
        QueueWatch(server) as watch,
    ):
        for c in (slow, r1, r2):
            await c.subscribe("feed")
        # From here on the slow client does not read.

        async def read_all(c: WsClient) -> list[dict[str, Any]]:
            return await c.publications("feed", MESSAGES, timeout=60)

        readers = [asyncio.create_task(read_all(r)) for r in (r1, r2)]
        offsets = await _publish_many(http, "feed", MESSAGES, workers=4)
        assert sorted(offsets.values()) == list(range(1, MESSAGES + 1))
        results = await asyncio.gather(*readers)
        for got in results:
            assert [f["offset"] for f in got] == list(range(1, MESSAGES + 1))
            assert {f["data"]["i"]: f["offset"] for f in got} == offsets
        for r in (r1, r2):
            await r.ping_ok()
        # No session ever held more than the configured queue.
        assert watch.samples > 0
        assert watch.max_bytes <= QUEUE_BYTES

        # Reading again: some publications (an in-order prefix), then the close.
        code, reason, frames = await slow.expect_close(timeout=30)
        assert (code, reason) == (4008, "slow consumer")
        pushes = [f for f in frames if isinstance(f, dict) and f.get("channel") == "feed"]
        assert len(pushes) < MESSAGES
        _assert_in_order_prefix([f["offset"] for f in pushes])
        await eventually(lambda: not _sessions_of(server, "slow"))
        assert {s.user for s in server.gateway.hub.sessions} == {"fast1", "fast2"}

        # What its queue held when it was cut was counted as delivered and never
        # written: drops (they stayed at 0, the deliveries counting them as sent).
        metrics = (await http.get("/metrics")).text
        drops, deliveries = (
            sample_value(metrics, f"gateway_{n}_total") for n in ("drops", "deliveries")
        )
        assert 0 < drops <= MESSAGES - len(pushes), (drops, len(pushes))
        assert deliveries - drops >= 2 * MESSAGES + len(pushes)

    await eventually(lambda: len(server.gateway.hub.sessions) == 0)


async def test_slow_ws_consumer_is_dropped_from_the_hub_before_it_reads_again(make_server):
    server = await make_server(client_queue_bytes=QUEUE_BYTES)
    sock = small_rcvbuf_socket(server.port)
    async with api_client(server) as http:
        async with ws_client(
            server, token("slow"), sock=sock, max_queue=1, compression=None
        ) as slow:
            await slow.subscribe("flood")
            await _publish_many(http, "flood", MESSAGES)
            # Still not reading: the server has already let go of this client's session
            # (and with it its queue and subscriptions).
            await eventually(lambda: not _sessions_of(server, "slow"), timeout=5)
            assert server.gateway.hub.local_subscribers("flood") == 0
            code, reason, _ = await slow.expect_close(timeout=30)
            assert (code, reason) == (4008, "slow consumer")
        # A new client can subscribe and recover from history right away.
        async with ws_client(server) as c:
            epoch = await _epoch(http, "flood")
            since = {"offset": MESSAGES - 5, "epoch": epoch}
            result = await c.subscribe("flood", since=since)
            assert result == {"offset": MESSAGES, "epoch": epoch, "recovered": True}
            got = await c.publications("flood", 5)
            assert [f["offset"] for f in got] == list(range(MESSAGES - 4, MESSAGES + 1))


async def _epoch(http: httpx.AsyncClient, channel: str) -> str:
    r = await http.get(
        f"/api/channels/{channel}/history", headers={"Authorization": f"Bearer {token()}"}
    )
    assert r.status_code == 200
    epoch = r.json()["epoch"]
    assert isinstance(epoch, str)
    return epoch


async def test_slow_sse_reader_stream_is_ended_by_the_server(make_server):
    server = await make_server(client_queue_bytes=QUEUE_BYTES)
    transport = httpx.AsyncHTTPTransport(
        socket_options=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)]
    )
    async with (
        httpx.AsyncClient(
            base_url=server.url,
            transport=transport,
            trust_env=False,
            timeout=httpx.Timeout(10, read=30),
        ) as slow_http,
        api_client(server) as http,
        ws_client(server, token("fast"), compression=None) as fast,
        QueueWatch(server) as watch,
    ):
        await fast.subscribe("feed")
        params = sse_params(["feed"], token("slow-sse"))
        async with slow_http.stream(
            "GET", "/sse", params=params, headers={"Accept": "text/event-stream"}
        ) as resp:
            assert resp.status_code == 200
            await eventually(lambda: _sessions_of(server, "slow-sse"))
            # The SSE client reads nothing while thousands of publications go out.
            reader = asyncio.create_task(fast.publications("feed", MESSAGES, timeout=60))
            offsets = await _publish_many(http, "feed", MESSAGES, workers=4)
            got = await reader
            assert [f["offset"] for f in got] == list(range(1, MESSAGES + 1))
            assert {f["data"]["i"]: f["offset"] for f in got} == offsets
            assert watch.max_bytes <= QUEUE_BYTES

            # Reading again: what was already on the wire, then the end of the stream.
            events: list[dict[str, Any]] = []

            async def drain() -> None:
                with contextlib.suppress(httpx.RemoteProtocolError, httpx.ReadError):
                    async for item in parse_sse(resp.aiter_lines()):
                        events.append(item)

            await asyncio.wait_for(drain(), 30)
        pubs = [e for e in events if "data" in e and "event" not in e]
        assert len(pubs) < MESSAGES
        _assert_in_order_prefix([orjson.loads(e["data"])["offset"] for e in pubs])
    await eventually(lambda: len(server.gateway.hub.sessions) == 0)


async def test_slow_sse_reader_is_dropped_from_the_hub_before_it_reads_again(make_server):
    server = await make_server(client_queue_bytes=QUEUE_BYTES)
    transport = httpx.AsyncHTTPTransport(
        socket_options=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)]
    )
    async with (
        httpx.AsyncClient(base_url=server.url, transport=transport, trust_env=False) as slow_http,
        api_client(server) as http,
    ):
        params = sse_params(["feed"], token("slow-sse"))
        async with slow_http.stream("GET", "/sse", params=params) as resp:
            assert resp.status_code == 200
            await eventually(lambda: _sessions_of(server, "slow-sse"))
            await _publish_many(http, "feed", MESSAGES)
            await eventually(lambda: not _sessions_of(server, "slow-sse"), timeout=5)
            assert server.gateway.hub.local_subscribers("feed") == 0


async def test_reader_that_keeps_up_is_never_cut_off_with_small_queue(make_server):
    server = await make_server(client_queue_bytes=QUEUE_BYTES)
    async with api_client(server) as http, ws_client(server, compression=None) as c:
        await c.subscribe("steady")
        reader = asyncio.create_task(c.publications("steady", 500, timeout=30))
        await _publish_many(http, "steady", 500, workers=4)
        got = await reader
        assert [f["offset"] for f in got] == list(range(1, 501))
        await c.ping_ok()


# --------------------------------------------------------------------------- send timeout
# Far below the queue bound, a client whose socket stays full is still cut off: after
# GATEWAY_SEND_TIMEOUT seconds of one write waiting for it (sse-starlette's send_timeout).

ROOMY = 256 * 1024 * 1024  # a queue bound these tests never reach


async def _publish_until_gone(server: RunningServer, http: httpx.AsyncClient, user: str) -> None:
    """Publish until the server has cut ``user`` off: as much as it takes to fill the kernel's
    buffers on both sides, and at most 64 MB."""
    for _ in range(40):
        if not _sessions_of(server, user):
            return
        await _publish_many(http, "feed", 100, pad="x" * 16_000)
    await eventually(lambda: not _sessions_of(server, user), timeout=10)


async def test_a_websocket_whose_socket_stays_full_is_closed_after_the_send_timeout(
    make_server,
):
    server = await make_server(client_queue_bytes=ROOMY, send_timeout=0.5)
    sock = small_rcvbuf_socket(server.port)
    async with (
        api_client(server) as http,
        ws_client(server, token("stuck"), sock=sock, max_queue=1, compression=None) as stuck,
        QueueWatch(server) as watch,
    ):
        await stuck.subscribe("feed")
        await _publish_until_gone(server, http, "stuck")
        assert watch.max_bytes < ROOMY
        code, reason, _ = await stuck.expect_close(timeout=60)
        assert (code, reason) == (4008, "slow consumer")
    assert server.gateway.connections.slow_closes["websocket"] == 1


async def test_an_sse_stream_whose_socket_stays_full_is_ended_after_the_send_timeout(
    make_server,
):
    from tests.test_sse_raw import raw_sse

    server = await make_server(client_queue_bytes=ROOMY, send_timeout=0.5)
    async with api_client(server) as http, raw_sse(server, ["feed"], rcvbuf=8192) as stream:
        await stream.chunk()
        await _publish_until_gone(server, http, "raw")
    assert server.gateway.connections.slow_closes["sse"] == 1


@pytest.mark.parametrize("close", ["close_transport", "transport.close"])
async def test_a_closed_connection_whose_client_never_reads_is_let_go(close: str) -> None:
    """A connection closed with bytes its client never reads (a slow consumer's close
    frame, what was queued before it): a transport's ``close`` waits to send them, and
    held the socket, its descriptor and megabytes of buffer for as long as the client
    kept the connection (minutes in an audit). ``close_transport`` aborts it once the
    grace is over; plain ``close`` (shown for contrast) is still holding it then."""
    from gateway.server import waiting

    lost = asyncio.Event()
    transports: list[asyncio.Transport] = []

    class Server(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            transports.append(transport)

        def connection_lost(self, exc: Exception | None) -> None:
            lost.set()

    loop = asyncio.get_running_loop()
    listener = await loop.create_server(Server, "127.0.0.1", 0)
    client = small_rcvbuf_socket(listener.sockets[0].getsockname()[1], 4096)
    try:
        await eventually(lambda: bool(transports))
        transport = transports[0]
        transport.write(b"x" * (16 << 20))  # far more than the kernel's buffers take
        assert transport.get_write_buffer_size() > 0
        if close == "close_transport":
            waiting.close_transport(transport, grace=0.2)
            await asyncio.wait_for(lost.wait(), 5)
        else:
            transport.close()
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(lost.wait(), 1)
            transport.abort()
    finally:
        client.close()
        listener.close()
