"""The gateway on every Redis topology, end to end: two real worker processes on shards,
a Sentinel master and a Redis Cluster (the session's setups, tests/redis_topologies.py),
with publish, fan-out across workers, history, presence, a resume, the cross-worker
cancel of an LLM stream, /readyz and /metrics."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.helpers import bearer
from tests.procs import GatewayProcess
from tests.test_redis_cluster import (
    gateway_env,
    http_to,
    publish_via_api,
    start_gateways,
    ws_to,
)

TOPOLOGIES = ["redis_shards", "redis_sentinel", "redis_cluster"]


@pytest.fixture(params=TOPOLOGIES)
def workers(request: pytest.FixtureRequest) -> Iterator[list[GatewayProcess]]:
    setup = request.getfixturevalue(request.param)
    prefix = f"e2e-{secrets.token_hex(4)}"
    procs = start_gateways(2, gateway_env(setup, prefix))  # its .url: the topology's
    yield procs
    for proc in procs:
        proc.stop()


async def test_every_feature_works_across_workers_on_the_topology(
    workers: list[GatewayProcess],
) -> None:
    a, b = workers
    # Channels on different shards / masters (fixed names: placement is deterministic).
    channels = ["chat:doomed", "chat:kept", "prices:moving", "prices:other"]
    async with ws_to(a, "alice") as alice, ws_to(b, "bob") as bob, http_to(b) as api:
        for channel in channels:
            await alice.subscribe(channel)
        await bob.subscribe("chat:kept")
        await alice.presence_push("chat:kept", "join", user="bob")
        published: dict[str, list[dict[str, Any]]] = {}
        for channel in channels:
            published[channel] = [await publish_via_api(api, channel, n) for n in range(3)]
            got = await alice.publications(channel, 3)
            assert [p["offset"] for p in got] == [1, 2, 3]
        # History and presence through the other worker's API.
        r = await api.get("/api/channels/prices:moving/history", headers=bearer())
        assert r.status_code == 200, r.text
        assert [p["data"] for p in r.json()["publications"]] == [0, 1, 2]
        r = await api.get("/api/channels/chat:kept/presence", headers=bearer())
        assert sorted(c["user"] for c in r.json()["clients"]) == ["alice", "bob"]
        # A resume on the other worker gets exactly what followed.
        first = published["prices:other"][0]
        since = {"offset": first["offset"], "epoch": first["epoch"]}
        result = await bob.subscribe("prices:other", since=since)
        assert result["recovered"] is True
        assert [p["offset"] for p in await bob.publications("prices:other", 2)] == [2, 3]
        # An LLM stream cancel for a stream no worker runs: asked across workers, not found.
        r = await api.delete("/api/streams/no-such-stream", headers=bearer())
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    for proc in workers:
        async with httpx.AsyncClient(base_url=proc.url, trust_env=False) as http:
            assert (await http.get("/readyz")).status_code == 200
            metrics = (await http.get("/metrics")).text
            assert "gateway_broker_reconnects_total 0.0" in metrics
