"""Rolling restarts lose nothing: real ``python -m gateway`` processes on one real Redis.

Three workers (no load balancer: the test plays it, keeping the list of live workers) serve
WebSocket and SSE subscribers of one channel while a publisher keeps publishing through
the HTTP API of whichever worker is up. The workers are restarted one after another the
way Kubernetes does it: taken out of the live list, SIGTERM, wait for the exit, a new one
started (on a new port). On each SIGTERM the worker reports not ready (or refuses
connections) at once and exits within ``GATEWAY_DRAIN_SECONDS``; its WebSocket clients get
1012 "service restart" and its SSE streams end; every client reconnects to a live worker
and resumes from its position (WebSocket ``since``, SSE ``Last-Event-ID``). At the end each
subscriber has received every offset of the channel exactly once, in order.

The last test is the regression test for a drain that could take twice
``GATEWAY_DRAIN_SECONDS`` (or more) when a client stopped reading.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import signal
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from tests.conftest import SECRET, token
from tests.helpers import WsClient, bearer, parse_sse, poll, small_rcvbuf_socket
from tests.procs import GatewayProcess
from tests.redis_server import RedisServer

DRAIN_SECONDS = 3.0
EXIT_MARGIN = 3.0  # process start-up of the interpreter aside, the exit takes well under 1 s
PUBLISH_INTERVAL = 0.02


def worker_env(redis: RedisServer, prefix: str) -> dict[str, str]:
    return {
        "GATEWAY_JWT_SECRET": SECRET,
        "GATEWAY_BROKER_URL": redis.url,
        "GATEWAY_BROKER_PREFIX": prefix,
        "GATEWAY_DRAIN_SECONDS": str(DRAIN_SECONDS),
        # Reconnects take well under a second; history covers far more than that.
        "GATEWAY_HISTORY_SIZE": "10000",
        "GATEWAY_LOG_LEVEL": "warning",
    }


class Workers:
    """The workers and which of them are live: what a load balancer's endpoint list holds."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.started: list[GatewayProcess] = []
        self.live: list[GatewayProcess] = []
        self._turn = itertools.count()

    async def start(self, n: int) -> list[GatewayProcess]:
        procs = [GatewayProcess(self.env) for _ in range(n)]
        self.started.extend(procs)
        await asyncio.gather(*(proc.wait_ready(timeout=30) for proc in procs))
        self.live.extend(procs)
        return procs

    def pick(self) -> GatewayProcess:
        """The next live worker, round robin."""
        return self.live[next(self._turn) % len(self.live)]

    def stop_all(self) -> None:
        for proc in self.started:
            proc.stop()


@pytest.fixture
async def workers(redis_server: RedisServer, redis_prefix: str) -> AsyncIterator[Workers]:
    group = Workers(worker_env(redis_server, redis_prefix))
    yield group
    group.stop_all()


class Subscriber:
    """A client that stays subscribed across worker restarts, recording everything it got."""

    def __init__(self, name: str, workers: Workers, channel: str) -> None:
        self.name = name
        self.workers = workers
        self.channel = channel
        self.offsets: list[int] = []
        self.epochs: set[str] = set()
        self.current: GatewayProcess | None = None  # connected and subscribed to it
        # (worker, how the connection ended): a close code and reason, or "end" / an error.
        self.endings: list[tuple[GatewayProcess, Any]] = []
        self.connects = 0
        self.task: asyncio.Task[None] | None = None

    def start(self, first: GatewayProcess) -> None:
        self.task = asyncio.create_task(self._run(first), name=self.name)

    async def _run(self, first: GatewayProcess) -> None:
        target = first
        while True:
            try:
                await self.session(target)
            except (OSError, InvalidHandshake, TimeoutError, httpx.TransportError) as exc:
                # Picked a worker just as it went away: try another one.
                self.endings.append((target, f"connect failed: {exc!r}"))
                await asyncio.sleep(0.05)  # back-off, as a real client would
            finally:
                self.current = None
            target = self.workers.pick()

    async def session(self, target: GatewayProcess) -> None:
        raise NotImplementedError

    def received(self, offset: int, epoch: str) -> None:
        self.offsets.append(offset)
        self.epochs.add(epoch)

    async def stop(self) -> None:
        assert self.task is not None
        if self.task.done():
            self.task.result()  # a crashed subscriber fails the test with its own error
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


class WsSubscriber(Subscriber):
    def __init__(self, name: str, workers: Workers, channel: str) -> None:
        super().__init__(name, workers, channel)
        self.epoch: str | None = None
        self.resumed: list[dict[str, Any]] = []  # subscribe results of the reconnects

    async def session(self, target: GatewayProcess) -> None:
        url = f"{target.ws_url}/ws?token={token(self.name)}"
        async with connect(url, proxy=None, open_timeout=5, close_timeout=2) as conn:
            client = WsClient(conn)
            since = None
            if self.offsets:
                since = {"offset": self.offsets[-1], "epoch": self.epoch}
            elif self.epoch is not None:
                since = {"offset": 0, "epoch": self.epoch}
            try:
                result = await client.subscribe(self.channel, since=since)
                if since is None:
                    assert result["offset"] == 0, f"subscribed after publishing began: {result}"
                    self.epoch = result["epoch"]
                else:
                    self.resumed.append(result)
                self.current = target
                self.connects += 1
                for frame in client.backlog:  # pushes that came with the reply
                    self._frame(frame)
                client.backlog.clear()
                while True:
                    self._frame(orjson.loads(await conn.recv()))
            except ConnectionClosed as exc:
                rcvd = exc.rcvd
                self.endings.append((target, None if rcvd is None else (rcvd.code, rcvd.reason)))

    def _frame(self, frame: dict[str, Any]) -> None:
        if frame.get("channel") == self.channel and "offset" in frame and "ok" not in frame:
            self.received(frame["offset"], frame["epoch"])


class SseSubscriber(Subscriber):
    def __init__(self, name: str, workers: Workers, channel: str) -> None:
        super().__init__(name, workers, channel)
        self.last_event_id: str | None = None
        self.gaps: list[dict[str, Any]] = []
        self.refusals: list[tuple[int, bytes]] = []

    async def session(self, target: GatewayProcess) -> None:
        headers = {"Accept": "text/event-stream"}
        if self.last_event_id is not None:
            headers["Last-Event-ID"] = self.last_event_id  # what EventSource sends back
        params = {"channel": self.channel, "token": token(self.name)}
        timeout = httpx.Timeout(5.0, read=None)
        async with (
            httpx.AsyncClient(base_url=target.url, trust_env=False, timeout=timeout) as http,
            http.stream("GET", "/sse", params=params, headers=headers) as response,
        ):
            if response.status_code != 200:
                self.refusals.append((response.status_code, await response.aread()))
                self.endings.append((target, f"status {response.status_code}"))
                return
            self.current = target
            self.connects += 1
            try:
                async for event in parse_sse(response.aiter_lines()):
                    if "id" in event:
                        self.last_event_id = event["id"]
                    if "data" not in event:
                        continue
                    if event.get("event") == "gap":
                        self.gaps.append(orjson.loads(event["data"]))
                    elif "event" not in event:
                        push = orjson.loads(event["data"])
                        self.received(push["offset"], push["epoch"])
            except httpx.TransportError as exc:
                self.endings.append((target, f"broken stream: {exc!r}"))
                return
            self.endings.append((target, "end"))


class Publisher:
    """Publishes 1, 2, 3 ... through the API of whichever worker is live, until stopped."""

    def __init__(self, workers: Workers, channel: str) -> None:
        self.workers = workers
        self.channel = channel
        self.accepted: list[tuple[float, int, str]] = []  # (when, offset, epoch)
        self.failures: list[Any] = []
        self._stop = asyncio.Event()
        self.task = asyncio.create_task(self._run(), name="publisher")

    async def _run(self) -> None:
        timeout = httpx.Timeout(5.0)
        async with httpx.AsyncClient(trust_env=False, timeout=timeout) as http:
            for n in itertools.count(1):
                if self._stop.is_set():
                    return
                target = self.workers.pick()
                try:
                    response = await http.post(
                        f"{target.url}/api/publish",
                        json={"channel": self.channel, "data": n},
                        headers=bearer(),
                    )
                except httpx.TransportError as exc:
                    # Its worker went away: the publication may or may not have been taken,
                    # which the final check allows (it counts offsets, not attempts).
                    self.failures.append(repr(exc))
                else:
                    if response.status_code == 200:
                        body = response.json()
                        self.accepted.append((time.monotonic(), body["offset"], body["epoch"]))
                    else:
                        self.failures.append((response.status_code, response.text))
                await asyncio.sleep(PUBLISH_INTERVAL)  # pacing

    def accepted_between(self, start: float, end: float) -> int:
        return sum(1 for when, _, _ in self.accepted if start <= when <= end)

    async def stop(self) -> None:
        self._stop.set()
        await self.task


async def readiness(proc: GatewayProcess, http: httpx.AsyncClient | None = None) -> int | str:
    """``/readyz`` status, or "refused" when no connection can be made (a new one when
    ``http`` is None, as kubelet's probes do)."""
    try:
        if http is not None:
            return (await http.get(f"{proc.url}/readyz")).status_code
        async with httpx.AsyncClient(trust_env=False, timeout=2.0) as fresh:
            return (await fresh.get(f"{proc.url}/readyz")).status_code
    except httpx.TransportError:
        return "refused"


async def test_rolling_restart_of_every_worker_loses_nothing_and_repeats_nothing(
    workers: Workers,
) -> None:
    channel = f"ticks-{secrets.token_hex(4)}"
    originals = await workers.start(3)
    subscribers: list[Subscriber] = []
    for i, proc in enumerate(originals):
        for j in range(2):
            subscribers.append(WsSubscriber(f"ws-{i}-{j}", workers, channel))
            subscribers[-1].start(proc)
        subscribers.append(SseSubscriber(f"sse-{i}", workers, channel))
        subscribers[-1].start(proc)
    ws_subscribers = [s for s in subscribers if isinstance(s, WsSubscriber)]
    sse_subscribers = [s for s in subscribers if isinstance(s, SseSubscriber)]
    publisher: Publisher | None = None
    try:
        # Everyone subscribed before the first publication: all must see offsets from 1.
        await poll(_async(lambda: all(s.connects == 1 for s in subscribers)), timeout=10)
        publisher = await _start_publisher(workers, channel)

        for old in originals:
            on_old = [s for s in subscribers if s.current is old]
            assert any(isinstance(s, WsSubscriber) for s in on_old), "no WebSocket client on it"
            assert any(isinstance(s, SseSubscriber) for s in on_old), "no SSE client on it"
            async with httpx.AsyncClient(trust_env=False, timeout=2.0) as kept_alive:
                assert await readiness(old, kept_alive) == 200

                # The load balancer stops sending it new clients, then the signal.
                workers.live.remove(old)
                signalled = time.monotonic()
                old.proc.send_signal(signal.SIGTERM)

                # Not ready at once: a probe's new connection is refused or answered 503,
                # and a connection that was already open is answered 503 (or closed).
                await poll(_async_not(readiness, old), timeout=1.0, interval=0.01)
                await poll(_async_not(readiness, old, kept_alive), timeout=1.0, interval=0.01)
                not_ready_after = time.monotonic() - signalled

            code = await old.wait_exit(DRAIN_SECONDS + EXIT_MARGIN)
            exited_after = time.monotonic() - signalled
            assert code in (0, -signal.SIGTERM), old.output()
            assert exited_after < DRAIN_SECONDS + EXIT_MARGIN
            assert not_ready_after < 1.0

            # Its clients were told to go (1012 / end of stream) and are on live workers.
            await poll(
                _async(lambda on_old=on_old: all(s.current in workers.live for s in on_old)),
                timeout=10,
            )
            for sub in on_old:
                endings = [how for proc, how in sub.endings if proc is old]
                expected = (1012, "service restart") if isinstance(sub, WsSubscriber) else "end"
                assert endings == [expected], (sub.name, endings)

            replacement = (await workers.start(1))[0]
            back = time.monotonic()
            # Publishing never stopped while a worker was missing.
            assert publisher.accepted_between(signalled, back) > 0
            assert replacement.proc.poll() is None

        await publisher.stop()
        top_offset, epoch = await _channel_top(workers, channel)
        assert [offset for _, offset, _ in publisher.accepted] == sorted(
            offset for _, offset, _ in publisher.accepted
        )
        assert {e for _, _, e in publisher.accepted} == {epoch}
        assert len(publisher.accepted) >= 50, "the publisher hardly published"

        # Everyone catches up with the last publication...
        await poll(
            _async(lambda: all(len(s.offsets) >= top_offset for s in subscribers)), timeout=10
        )
        # ...and has every offset exactly once, in order, in the one epoch.
        every_offset = list(range(1, top_offset + 1))
        for sub in subscribers:
            assert sub.offsets == every_offset, (sub.name, _describe(sub.offsets, top_offset))
            assert sub.epochs == {epoch}, sub.name
        for sub in ws_subscribers:
            for result in sub.resumed:
                assert result["recovered"] is True and result["epoch"] == epoch, result
        for sub in sse_subscribers:
            assert sub.gaps == [], sub.name
        # Every client had to move at least once (all three original workers were replaced).
        assert all(s.connects >= 2 for s in subscribers)
    finally:
        if publisher is not None and not publisher.task.done():
            await publisher.stop()
        for sub in subscribers:
            with contextlib.suppress(BaseException):
                await sub.stop()


async def _start_publisher(workers: Workers, channel: str) -> Publisher:
    publisher = Publisher(workers, channel)
    await poll(_async(lambda: len(publisher.accepted) >= 10), timeout=10)
    return publisher


async def _channel_top(workers: Workers, channel: str) -> tuple[int, str]:
    """The channel's last offset and epoch, as the cluster's history says."""
    async with httpx.AsyncClient(trust_env=False, timeout=5.0) as http:
        response = await http.get(
            f"{workers.pick().url}/api/channels/{channel}/history",
            params={"limit": 1},
            headers=bearer(),
        )
    assert response.status_code == 200, response.text
    body = response.json()
    return int(body["offset"]), str(body["epoch"])


def _describe(offsets: list[int], top: int) -> str:
    missing = sorted(set(range(1, top + 1)) - set(offsets))
    repeated = sorted({o for o in offsets if offsets.count(o) > 1})
    disorder = [(a, b) for a, b in itertools.pairwise(offsets) if b <= a]
    return f"missing={missing[:10]} repeated={repeated[:10]} out_of_order={disorder[:5]}"


def _async(check: Any) -> Any:
    async def predicate() -> Any:
        return check()

    return predicate


def _async_not(probe: Any, *args: Any) -> Any:
    async def predicate() -> bool:
        return bool(await probe(*args) != 200)

    return predicate


# --------------------------------------------------------------------------- regression


async def test_a_client_that_stops_reading_cannot_stretch_the_exit_past_the_drain_budget() -> None:
    """Regression: the drain waited up to ``GATEWAY_DRAIN_SECONDS`` for sessions, then
    uvicorn waited up to ``GATEWAY_DRAIN_SECONDS`` again for the connections still open,
    so an SSE client that stopped reading (its writer blocked on a full socket) plus a
    streamed publish that never ended kept the worker alive for twice the budget and more
    (7.2 s with a 3 s budget). The budget now covers the whole shutdown."""
    proc = GatewayProcess(
        {
            "GATEWAY_JWT_SECRET": SECRET,
            "GATEWAY_DRAIN_SECONDS": str(DRAIN_SECONDS),
            "GATEWAY_LOG_LEVEL": "warning",
            # Not a slow consumer (which would be closed at once): just one that stalls.
            "GATEWAY_CLIENT_QUEUE_BYTES": str(64 * 1024 * 1024),
            "GATEWAY_MAX_MESSAGE_BYTES": str(200_000),
        }
    )
    sockets: list[socket.socket] = []
    try:
        await proc.wait_ready()
        stalled = small_rcvbuf_socket(proc.port, 4096)
        sockets.append(stalled)
        stalled.sendall(
            f"GET /sse?channel=big&token={token()} HTTP/1.1\r\nHost: gw\r\n\r\n".encode()
        )
        endless = socket.create_connection(("127.0.0.1", proc.port))
        sockets.append(endless)
        endless.sendall(
            b"POST /api/publish/stream?channel=other HTTP/1.1\r\nHost: gw\r\n"
            b"Transfer-Encoding: chunked\r\nAuthorization: Bearer " + token().encode() + b"\r\n\r\n"
        )
        async with httpx.AsyncClient(base_url=proc.url, trust_env=False, timeout=10) as http:

            async def sse_open() -> bool:
                metrics = (await http.get("/metrics")).text
                return 'gateway_connections{transport="sse"} 1.0' in metrics

            await poll(sse_open, timeout=5)
            # ~10 MB: more than the kernel's socket buffers take, so the writer blocks.
            for _ in range(100):
                response = await http.post(
                    "/api/publish",
                    json={"channel": "big", "data": "x" * 100_000},
                    headers=bearer(),
                )
                assert response.status_code == 200, response.text

        signalled = time.monotonic()
        proc.proc.send_signal(signal.SIGTERM)
        code = await proc.wait_exit(4 * DRAIN_SECONDS)
        exited_after = time.monotonic() - signalled
        assert code in (0, -signal.SIGTERM)
        # The scenario did what it is meant to: a session outlived the drain.
        assert "still open after the drain" in proc.output(), proc.output()
        assert exited_after < DRAIN_SECONDS + 1.5, f"exited after {exited_after:.2f}s"
    finally:
        for sock in sockets:
            sock.close()
        proc.stop()


def _server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """The (unmasked) frames a server wrote, as (opcode, payload); a cut last one left out."""
    frames, at = [], 0
    while at + 2 <= len(data):
        size, start = data[at + 1] & 0x7F, at + 2
        if size == 126:
            size, start = int.from_bytes(data[at + 2 : at + 4], "big"), at + 4
        elif size == 127:
            size, start = int.from_bytes(data[at + 2 : at + 10], "big"), at + 10
        if start + size > len(data):
            break
        frames.append((data[at] & 0x0F, data[start : start + size]))
        at = start + size
    return frames


async def test_a_slow_reader_gets_what_was_queued_for_it_and_its_1012_before_the_exit() -> None:
    """Regression: the drain counted a session done once its messages were in the
    transport's buffer, and the process exited with them there (and its close frame):
    a client reading slowly got a part of them and no close frame. The server now waits,
    within the drain budget, until its sockets' buffers (its own and the kernel's) are
    sent."""
    proc = GatewayProcess(
        {
            "GATEWAY_JWT_SECRET": SECRET,
            "GATEWAY_DRAIN_SECONDS": "10",
            "GATEWAY_LOG_LEVEL": "warning",
            "GATEWAY_CLIENT_QUEUE_BYTES": str(64 * 1024 * 1024),
        }
    )
    sockets: list[socket.socket] = []
    try:
        await proc.wait_ready()
        from tests.test_frames import TEXT, frame
        from tests.test_handshake import standard, upgrade

        slow = small_rcvbuf_socket(proc.port, 4096)
        sockets.append(slow)
        slow.setblocking(True)
        slow.sendall(upgrade(headers=standard()))
        head = b""
        while b"\r\n\r\n" not in head:
            head += slow.recv(4096)
        subscribe = orjson.dumps({"id": 1, "op": "subscribe", "channel": "big"})
        slow.sendall(frame(TEXT, subscribe))
        received = head.partition(b"\r\n\r\n")[2]
        while b'"ok":true' not in received:
            received += slow.recv(4096)
        async with httpx.AsyncClient(base_url=proc.url, trust_env=False, timeout=10) as http:
            for _ in range(40):  # 2.4 MB: more than the kernel's buffers hold for it
                body = {"channel": "big", "data": "x" * 60_000}
                response = await http.post("/api/publish", json=body, headers=bearer())
                assert response.status_code == 200, response.text
        proc.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(1.0)  # the scenario: a client that reads again a second later
        # Its messages are unsent, in the kernel's queue at least: the worker waits for
        # them (an exited process's socket is the kernel's to give up, reset and all).
        assert proc.proc.poll() is None, "exited with its client's messages unsent"
        slow.settimeout(10)

        def read_all() -> bytes:
            data = b""
            with contextlib.suppress(OSError):
                while chunk := slow.recv(65536):
                    data += chunk
            return data

        received += await asyncio.to_thread(read_all)
        frames = _server_frames(received)
        pushes = [p for op, p in frames if op == TEXT and p.startswith(b'{"channel":"big"')]
        assert len(pushes) == 40, len(pushes)
        assert frames[-1] == (0x8, (1012).to_bytes(2, "big") + b"service restart")
        assert await proc.wait_exit(15) in (0, -signal.SIGTERM)
    finally:
        for sock in sockets:
            sock.close()
        proc.stop()
