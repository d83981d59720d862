"""Scale-out end to end: real gateway processes (``python -m gateway``) sharing one real Redis.

Publications cross workers once and in order, 4 concurrent publishers on 4 workers share one
offset sequence, clients resume on another worker, Redis outages and empty restarts keep
clients connected and lose nothing Redis accepted, a killed worker's clients leave presence
within the TTL, and the HTTP API reads the same history and presence everywhere.

Workers of one test share a unique key prefix (``GATEWAY_BROKER_PREFIX``) on the session's
redis-server; tests that stop Redis get their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect

from tests.conftest import SECRET, eventually, token
from tests.helpers import SseStream, WsClient, bearer, is_publication, open_sse, poll
from tests.procs import GatewayProcess
from tests.redis_server import RedisServer


def gateway_env(redis: RedisServer, prefix: str, **extra: str) -> dict[str, str]:
    return {
        "GATEWAY_BROKER_URL": redis.url,
        "GATEWAY_BROKER_PREFIX": prefix,
        "GATEWAY_JWT_SECRET": SECRET,
        "GATEWAY_LOG_LEVEL": "warning",
        **extra,
    }


def start_gateways(n: int, env: dict[str, str]) -> list[GatewayProcess]:
    """``n`` gateway processes started in parallel; ready (``/readyz`` 200) on return."""
    procs = [GatewayProcess(env) for _ in range(n)]
    deadline = time.monotonic() + 30
    try:
        with httpx.Client(trust_env=False, timeout=2) as client:
            for proc in procs:
                while True:
                    if proc.proc.poll() is not None:
                        raise RuntimeError(f"gateway exited early:\n{proc.output()}")
                    with contextlib.suppress(httpx.TransportError):
                        if client.get(proc.url + "/readyz").status_code == 200:
                            break
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"gateway not ready:\n{proc.output()}")
                    time.sleep(0.05)
    except BaseException:
        for proc in procs:
            proc.stop()
        raise
    return procs


@pytest.fixture(scope="module")
def cluster(redis_server: RedisServer) -> Iterator[list[GatewayProcess]]:
    """Four workers, shared by the tests that do not break anything (unique channels each)."""
    procs = start_gateways(4, gateway_env(redis_server, f"cluster-{secrets.token_hex(4)}"))
    yield procs
    for proc in procs:
        proc.stop()


def unique(base: str) -> str:
    return f"{base}-{secrets.token_hex(3)}"


@contextlib.asynccontextmanager
async def ws_to(proc: GatewayProcess, user: str = "alice") -> AsyncIterator[WsClient]:
    url = f"{proc.ws_url}/ws?token={token(user)}"
    async with connect(url, proxy=None, open_timeout=5, close_timeout=2, max_size=None) as conn:
        yield WsClient(conn)


@contextlib.asynccontextmanager
async def http_to(proc: GatewayProcess) -> AsyncIterator[httpx.AsyncClient]:
    timeout = httpx.Timeout(10.0, read=60.0)
    async with httpx.AsyncClient(base_url=proc.url, trust_env=False, timeout=timeout) as client:
        yield client


async def publish_via_api(http: httpx.AsyncClient, channel: str, data: Any) -> dict[str, Any]:
    response = await http.post(
        "/api/publish", json={"channel": channel, "data": data}, headers=bearer()
    )
    assert response.status_code == 200, (response.status_code, response.text)
    body: dict[str, Any] = response.json()
    return body


# (offset, epoch, data) of each publication received, data decoded from JSON.
Positions = list[tuple[int, str, Any]]


async def ws_positions(
    client: WsClient, channel: str, count: int, timeout: float = 10.0
) -> Positions:
    pushes = await client.publications(channel, count, timeout=timeout)
    return [(p["offset"], p["epoch"], p["data"]) for p in pushes]


async def sse_positions(stream: SseStream, count: int, timeout: float = 10.0) -> Positions:
    events = await stream.publications(count, timeout=timeout)
    return [(e["json"]["offset"], e["json"]["epoch"], e["json"]["data"]) for e in events]


# --------------------------------------------------------------------------- (a)


async def test_a_publication_through_one_worker_reaches_ws_and_sse_on_others_once_in_order(
    cluster: list[GatewayProcess],
) -> None:
    a, b, c = cluster[:3]
    channel = unique("news")
    async with ws_to(b) as ws, http_to(c) as sse_http, open_sse(sse_http, [channel]) as sse:
        await ws.subscribe(channel)
        async with http_to(a) as api:
            published = [await publish_via_api(api, channel, {"n": i}) for i in range(30)]
            assert [p["offset"] for p in published] == list(range(1, 31))
            epoch = published[0]["epoch"]
            expected = [(i + 1, epoch, {"n": i}) for i in range(30)]
            assert await ws_positions(ws, channel, 30) == expected
            assert await sse_positions(sse, 30) == expected
            # Exactly once: the next thing each receives is the next publication.
            await publish_via_api(api, channel, "last")
            assert await ws_positions(ws, channel, 1) == [(31, epoch, "last")]
            assert await sse_positions(sse, 1) == [(31, epoch, "last")]


# --------------------------------------------------------------------------- (b)


async def ws_publish_many(proc: GatewayProcess, channel: str, tag: int, n: int) -> list[int]:
    """``n`` WebSocket publishes, pipelined; the offsets the replies gave."""
    async with ws_to(proc, f"publisher-{tag}") as client:
        ids = list(range(1, n + 1))

        async def send_all() -> None:
            for i in ids:
                await client.send({"id": i, "op": "publish", "channel": channel, "data": [tag, i]})

        sender = asyncio.create_task(send_all())
        offsets = []
        for i in ids:
            reply = await client.reply(i, timeout=30)
            assert reply.get("ok") is True, reply
            offsets.append(reply["result"]["offset"])
        await sender
        return offsets


async def test_four_publishers_on_four_workers_share_one_sequence_seen_everywhere_in_order(
    cluster: list[GatewayProcess],
) -> None:
    channel = unique("firehose")
    per_publisher, total = 1000, 4000
    async with contextlib.AsyncExitStack() as stack:
        subscribers = [await stack.enter_async_context(ws_to(proc)) for proc in cluster]
        for client in subscribers:
            await client.subscribe(channel)
        sse_streams = []
        for proc in cluster[:2]:
            http = await stack.enter_async_context(http_to(proc))
            sse_streams.append(await stack.enter_async_context(open_sse(http, [channel])))

        results = await asyncio.gather(
            *(
                ws_publish_many(proc, channel, tag, per_publisher)
                for tag, proc in enumerate(cluster)
            )
        )
        assert sorted(o for offsets in results for o in offsets) == list(range(1, total + 1))
        for offsets in results:  # each publisher's own publications are in its order
            assert offsets == sorted(offsets)

        received = await asyncio.gather(
            *(client.publications(channel, total, timeout=30) for client in subscribers),
            *(stream.publications(total, timeout=30) for stream in sse_streams),
        )
        for pushes in received:
            frames = [p.get("json", p) for p in pushes]  # SSE events carry the push in "json"
            assert [f["offset"] for f in frames] == list(range(1, total + 1))
            assert len({f["epoch"] for f in frames}) == 1
        for client in subscribers:  # nothing after the last one (no duplicates queued)
            assert not [f for f in await client.silent(0.2) if is_publication(f, channel)]


# --------------------------------------------------------------------------- (c)


async def test_clients_resume_on_another_worker_without_loss_or_repeats(
    cluster: list[GatewayProcess],
) -> None:
    a, b, publisher = cluster[0], cluster[1], cluster[3]
    channel = unique("resume")
    async with http_to(publisher) as api:
        async with ws_to(a) as ws, http_to(a) as http, open_sse(http, [channel]) as sse:
            await ws.subscribe(channel)
            for i in range(10):
                await publish_via_api(api, channel, i)
            seen = await ws_positions(ws, channel, 10)
            assert [s[0] for s in seen] == list(range(1, 11))
            await sse_positions(sse, 10)
            cursor = sse.last_id
            assert cursor is not None
        last_offset, epoch, _ = seen[-1]

        # Cut off from A: ten more publications happen meanwhile.
        for i in range(10, 20):
            await publish_via_api(api, channel, i)

        async with ws_to(b) as ws:
            result = await ws.subscribe(channel, since={"offset": last_offset, "epoch": epoch})
            assert result == {"offset": 20, "epoch": epoch, "recovered": True}
            assert await ws_positions(ws, channel, 10) == [(i + 1, epoch, i) for i in range(10, 20)]
            async with (
                http_to(b) as http,
                open_sse(http, [channel], headers={"Last-Event-ID": cursor}) as sse,
            ):
                assert await sse_positions(sse, 10) == [(i + 1, epoch, i) for i in range(10, 20)]
                await publish_via_api(api, channel, "live")
                assert await ws_positions(ws, channel, 1) == [(21, epoch, "live")]
                assert await sse_positions(sse, 1) == [(21, epoch, "live")]


# --------------------------------------------------------------------------- (f)


async def test_history_and_presence_read_the_same_from_every_worker(
    cluster: list[GatewayProcess],
) -> None:
    channel = unique("chat:f")
    async with contextlib.AsyncExitStack() as stack:
        for i, proc in enumerate(cluster[:2]):
            client = await stack.enter_async_context(ws_to(proc, f"user-{i}"))
            await client.subscribe(channel)
        async with http_to(cluster[2]) as api:
            for i in range(5):
                await publish_via_api(api, channel, {"i": i})
        histories, presences = [], []
        for proc in cluster:
            async with http_to(proc) as http:
                r = await http.get(f"/api/channels/{channel}/history", headers=bearer())
                assert r.status_code == 200, r.text
                histories.append(r.json())
                r = await http.get(f"/api/channels/{channel}/presence", headers=bearer())
                assert r.status_code == 200, r.text
                presences.append(sorted(c["user"] for c in r.json()["clients"]))
        assert [p["offset"] for p in histories[0]["publications"]] == [1, 2, 3, 4, 5]
        assert histories[0]["offset"] == 5
        assert all(h == histories[0] for h in histories)
        assert presences == [["user-0", "user-1"]] * len(cluster)


# --------------------------------------------------------------------------- (d)


class Publisher:
    """Publishes through the HTTP API in a loop, recording what was accepted and refused."""

    def __init__(self, http: httpx.AsyncClient, channel: str) -> None:
        self.http = http
        self.channel = channel
        self.accepted: list[tuple[int, str]] = []
        self.refusals: list[tuple[int, Any]] = []
        self._stop = asyncio.Event()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            r = await self.http.post(
                "/api/publish", json={"channel": self.channel, "data": n}, headers=bearer()
            )
            if r.status_code == 200:
                self.accepted.append((r.json()["offset"], r.json()["epoch"]))
            else:
                self.refusals.append((r.status_code, r.json()))
            await asyncio.sleep(0.005)

    async def stop(self) -> None:
        self._stop.set()
        await self.task


async def ready_status(proc: GatewayProcess) -> int:
    async with http_to(proc) as http:
        return (await http.get("/readyz")).status_code


async def all_ready(procs: list[GatewayProcess], status: int) -> bool:
    return all([await ready_status(p) == status for p in procs])


async def test_redis_outage_and_empty_restart_keep_clients_and_lose_nothing_redis_accepted(
    own_redis_server: RedisServer,
) -> None:
    redis = own_redis_server
    procs = start_gateways(3, gateway_env(redis, "outage"))
    a, b, c = procs
    channel = unique("ticks")
    try:
        async with (
            ws_to(b) as ws,
            http_to(c) as sse_http,
            open_sse(sse_http, [channel]) as sse,
            http_to(a) as api,
        ):
            await ws.subscribe(channel)
            publisher = Publisher(api, channel)
            try:
                await eventually(lambda: len(publisher.accepted) >= 20, timeout=10)

                # Redis goes away (with a snapshot, so the restarted one has the same data).
                redis.stop(save=True)
                await poll(lambda: all_ready(procs, 503), timeout=10)
                await eventually(lambda: publisher.refusals, timeout=10)
                status, body = publisher.refusals[0]
                assert status == 503
                assert body["error"] == {"code": "internal", "message": "broker unavailable"}
                await ws.ping_ok()  # still connected while Redis is down
                assert not sse.ended

                redis.start()
                await poll(lambda: all_ready(procs, 200), timeout=15)
                after = len(publisher.accepted)
                await eventually(lambda: len(publisher.accepted) >= after + 20, timeout=10)
            finally:
                await publisher.stop()

            top, epoch = publisher.accepted[-1]
            accepted = [offset for offset, _ in publisher.accepted]
            assert {e for _, e in publisher.accepted} == {epoch}
            assert accepted == sorted(accepted) and set(accepted) <= set(range(1, top + 1))
            # Everything Redis accepted, each once, in order, on both transports.
            expected = list(range(1, top + 1))
            assert [o for o, e, _ in await ws_positions(ws, channel, top)] == expected
            assert [o for o, e, _ in await sse_positions(sse, top)] == expected

            # Redis restarted empty: a new epoch, a gap for SSE, recovered:false for WS.
            redis.restart()
            gap = await sse.data_event(timeout=15)
            assert gap.get("event") == "gap" and gap["json"] == {"channel": channel}
            await poll(lambda: all_ready(procs, 200), timeout=15)
            await ws.call("unsubscribe", channel=channel)
            result = await ws.subscribe(channel, since={"offset": top, "epoch": epoch})
            assert result["recovered"] is False and result["epoch"] != epoch
            assert result["offset"] == 0
            new = await publish_via_api(api, channel, "after")
            assert (new["offset"], new["epoch"]) == (1, result["epoch"])
            assert await ws_positions(ws, channel, 1) == [(1, new["epoch"], "after")]
            assert await sse_positions(sse, 1) == [(1, new["epoch"], "after")]
            metrics = (await api.get("/metrics")).text
            assert "gateway_broker_reconnects_total 2.0" in metrics
    finally:
        for proc in procs:
            proc.stop()


# --------------------------------------------------------------------------- (e)


async def test_a_killed_worker_leaves_presence_within_the_ttl_and_the_others_carry_on(
    redis_server: RedisServer,
) -> None:
    ttl = 2.0
    procs = start_gateways(
        3, gateway_env(redis_server, unique("kill"), GATEWAY_PRESENCE_TTL=str(ttl))
    )
    doomed, survivor, reader = procs
    channel = "chat:x"
    try:
        async with ws_to(doomed, "doomed") as lost, ws_to(survivor, "survivor") as kept:
            # The survivor first: then the doomed client's join is announced after the
            # survivor's worker subscribed, and reaches it (before, whether it did was a race
            # that the presence events asserted below lost one run in five).
            await kept.subscribe(channel)
            await lost.subscribe(channel)
            await kept.presence_push(channel, "join", user="doomed")

            async def users() -> list[str]:
                async with http_to(reader) as http:
                    r = await http.get(f"/api/channels/{channel}/presence", headers=bearer())
                    assert r.status_code == 200, r.text
                    return sorted(c["user"] for c in r.json()["clients"])

            assert await users() == ["doomed", "survivor"]
            doomed.proc.kill()
            killed_at = time.monotonic()
            await poll(lambda: _users_are(users, ["survivor"]), timeout=ttl + 3)
            assert time.monotonic() - killed_at <= ttl + 0.5
            # The dead worker's client also gets its leave push, once (whichever live
            # worker expires the entry first announces it): within a refresh round more.
            left = await kept.presence_push(channel, "leave", user="doomed", timeout=ttl + 3)
            assert left["client"]["user"] == "doomed"
            assert time.monotonic() - killed_at <= ttl * 4 / 3 + 1.0
            # The survivor's entry is refreshed (it outlives the TTL) and it still gets pushes.
            while time.monotonic() - killed_at < ttl * 1.5:
                assert await users() == ["survivor"]
                await asyncio.sleep(0.2)
            async with http_to(reader) as api:
                sent = await publish_via_api(api, channel, "still here")
            pushes = await kept.publications(channel, 1)
            assert pushes[0]["offset"] == sent["offset"]
            # Nothing else about presence came before that publication: no second leave,
            # and no leave or re-join for the survivor, whose entry never lapsed (its
            # own join, from when it subscribed, is all there is).
            presence = [(f["event"], f["client"]["user"]) for f in kept.backlog if "event" in f]
            assert presence == [("join", "survivor")], presence
    finally:
        for proc in procs:
            proc.stop()


async def _users_are(users: Any, expected: list[str]) -> bool:
    return bool(await users() == expected)
