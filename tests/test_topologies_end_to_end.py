"""The gateway on every Redis topology, end to end: two real worker processes on shards,
a Sentinel master and a Redis Cluster (the session's setups, tests/redis_topologies.py),
with publish, fan-out across workers, history, presence, a resume, the cross-worker
cancel of an LLM stream, /readyz and /metrics. The clients are the project's own
(gatewayclient)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import httpx
import pytest

from gatewayclient import Position, PresenceEvent, Publication, Publisher, Subscription, connect
from tests.conftest import token
from tests.helpers import bearer
from tests.procs import GatewayProcess
from tests.test_redis_cluster import gateway_env, start_gateways

TOPOLOGIES = ["redis_shards", "redis_sentinel", "redis_cluster"]


@pytest.fixture(params=TOPOLOGIES)
def workers(request: pytest.FixtureRequest) -> Iterator[list[GatewayProcess]]:
    setup = request.getfixturevalue(request.param)
    prefix = f"e2e-{secrets.token_hex(4)}"
    procs = start_gateways(2, gateway_env(setup, prefix))  # its .url: the topology's
    yield procs
    for proc in procs:
        proc.stop()


async def publications(sub: Subscription, count: int) -> list[Publication]:
    """The next ``count`` publications (presence events skipped)."""
    got: list[Publication] = []
    while len(got) < count:
        item = await sub.get(10)
        if isinstance(item, Publication):
            got.append(item)
        else:
            assert isinstance(item, PresenceEvent), item  # never a Gap
    return got


async def joined(sub: Subscription, user: str) -> None:
    """Until ``user``'s join (other presence events skipped)."""
    while not (
        isinstance(item := await sub.get(10), PresenceEvent)
        and item.event == "join"
        and item.client.get("user") == user
    ):
        assert isinstance(item, PresenceEvent), item


async def test_every_feature_works_across_workers_on_the_topology(
    workers: list[GatewayProcess],
) -> None:
    a, b = workers
    # Channels on different shards / masters (fixed names: placement is deterministic).
    channels = ["chat:doomed", "chat:kept", "prices:moving", "prices:other"]
    async with (
        connect(a.url, token=token("alice")) as alice,
        connect(b.url, token=token("bob")) as bob,
        Publisher(b.url, token("backend")) as api,
    ):
        subs = {channel: await alice.subscribe(channel) for channel in channels}
        await bob.subscribe("chat:kept")
        await joined(subs["chat:kept"], "bob")
        published = {}
        for channel in channels:
            published[channel] = [await api.publish(channel, n) for n in range(3)]
            got = await publications(subs[channel], 3)
            assert [p.offset for p in got] == [1, 2, 3]
        # History and presence through the other worker's API.
        page = await api.history("prices:moving")
        assert [p.data for p in page.publications] == [0, 1, 2]
        assert sorted(c["user"] for c in await api.presence("chat:kept")) == ["alice", "bob"]
        # A resume on the other worker gets exactly what followed.
        first = published["prices:other"][0]
        resumed = await bob.subscribe("prices:other", since=Position(first.epoch, first.offset))
        assert resumed.recovered is True
        assert [p.offset for p in await publications(resumed, 2)] == [2, 3]
        # The gateway sent nothing twice (the client would have dropped it).
        assert all(sub.repeats == 0 for sub in [*subs.values(), resumed])
        # An LLM stream cancel for a stream no worker runs: asked across workers, not found.
        async with httpx.AsyncClient(base_url=b.url, trust_env=False, timeout=10.0) as http:
            r = await http.delete("/api/streams/no-such-stream", headers=bearer())
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    for proc in workers:
        async with httpx.AsyncClient(base_url=proc.url, trust_env=False) as http:
            assert (await http.get("/readyz")).status_code == 200
            metrics = (await http.get("/metrics")).text
            assert "gateway_broker_reconnects_total 0.0" in metrics
