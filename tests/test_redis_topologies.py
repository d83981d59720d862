"""The Redis topologies of tests/redis_topologies.py, checked with plain redis-py clients.

Shards are separate servers; a sentinel client writes through the master, the replica
copies it, and after ``kill_master()`` the client finds the promoted replica; a cluster
client spreads keys over the three masters, a promoted replica keeps an acknowledged key,
a migrated slot moves with its keys, and sharded pub/sub works on a slot's master.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis
from redis.client import PubSub
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import MovedError
from redis.sentinel import Sentinel

from tests.redis_server import RedisServer, poll_until
from tests.redis_topologies import (
    RedisClusterSetup,
    RedisSentinelSetup,
    RedisShards,
    alive,
    query,
)


@contextmanager
def client(server: RedisServer) -> Iterator[redis.Redis]:
    with redis.Redis("127.0.0.1", server.port, decode_responses=True, socket_timeout=5) as conn:
        yield conn


# redis-py's Sentinel, cluster nodes and pubsub are partly untyped: typed here, once.


@contextmanager
def sentinel_client(setup: RedisSentinelSetup) -> Iterator[Sentinel]:
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        setup.sentinel_addresses, socket_timeout=2, decode_responses=True
    )
    try:
        yield sentinel
    finally:
        sentinel.close()


def discovered(sentinel: Sentinel) -> tuple[str, int]:
    """The master address the sentinels give a client."""
    host, port = sentinel.discover_master("gwmaster")  # type: ignore[no-untyped-call]
    return str(host), int(port)


def discovered_replicas(sentinel: Sentinel) -> list[tuple[str, int]]:
    found = sentinel.discover_slaves("gwmaster")  # type: ignore[no-untyped-call]
    return [(str(host), int(port)) for host, port in found]


def writer_of(sentinel: Sentinel) -> redis.Redis:
    """A client of the master that asks the sentinels where it is at each connection."""
    conn: redis.Redis = sentinel.master_for("gwmaster")  # type: ignore[no-untyped-call]
    return conn


def sharded_pubsub(conn: redis.Redis) -> PubSub:
    pubsub: PubSub = conn.pubsub()  # type: ignore[no-untyped-call]
    return pubsub


@contextmanager
def cluster_client(setup: RedisClusterSetup) -> Iterator[RedisCluster]:
    seeds = [
        ClusterNode("127.0.0.1", int(seed.rpartition(":")[2]))  # type: ignore[no-untyped-call]
        for seed in seeds_of(setup)
    ]
    conn = RedisCluster(startup_nodes=seeds, decode_responses=True, socket_timeout=5)
    try:
        yield conn
    finally:
        conn.close()


def seeds_of(setup: RedisClusterSetup) -> list[str]:
    scheme, _, hosts = setup.url.partition("://")
    assert scheme == "redis+cluster"
    return hosts.split(",")


def role(server: RedisServer) -> list[Any]:
    return list(query(server.port, "ROLE"))


def replica_of(setup: RedisClusterSetup, master: RedisServer) -> RedisServer:
    """The node replicating ``master`` now, as the replicas themselves tell (ROLE)."""
    live = [node for node in setup.nodes if alive(node)]
    found = [node for node in live if role(node)[:3] == ["slave", "127.0.0.1", master.port]]
    assert len(found) == 1, f"replicas of {master.port}: {[node.port for node in found]}"
    return found[0]


# --------------------------------------------------------------------------- Shards


def test_shards_are_independent_servers(redis_shards: RedisShards, redis_prefix: str) -> None:
    first, second = redis_shards.servers
    assert redis_shards.url == f"{first.url},{second.url}"
    assert first.url == f"redis://127.0.0.1:{first.port}/0" and first.port != second.port
    with client(first) as one, client(second) as two:
        assert one.info("server")["run_id"] != two.info("server")["run_id"]
        one.set(f"{redis_prefix}:k", "first")
        assert one.get(f"{redis_prefix}:k") == "first"
        assert two.get(f"{redis_prefix}:k") is None
        assert two.info("replication")["role"] == "master" == one.info("replication")["role"]


# --------------------------------------------------------------------------- Sentinel


def test_sentinel_serves_the_master_and_its_replica(
    redis_sentinel: RedisSentinelSetup, redis_prefix: str
) -> None:
    hosts = ",".join(f"127.0.0.1:{port}" for _, port in redis_sentinel.sentinel_addresses)
    assert redis_sentinel.url == f"redis+sentinel://{hosts}/gwmaster/0"
    assert len(redis_sentinel.sentinel_addresses) == 3
    master = redis_sentinel.master()
    (replica,) = [server for server in redis_sentinel.servers if server is not master]
    assert role(master)[0] == "master"
    assert role(replica)[:3] == ["slave", "127.0.0.1", master.port]
    with sentinel_client(redis_sentinel) as sentinel:
        assert discovered(sentinel) == ("127.0.0.1", master.port)
        assert discovered_replicas(sentinel) == [("127.0.0.1", replica.port)]
        with writer_of(sentinel) as writer:
            writer.set(f"{redis_prefix}:k", "v")
    with client(replica) as conn:
        poll_until(
            lambda: conn.get(f"{redis_prefix}:k") == "v",
            timeout=5,
            what="the replica to have the key written through the sentinel client",
        )


def test_sentinel_kill_master_promotes_the_replica(
    own_redis_sentinel: RedisSentinelSetup, redis_prefix: str
) -> None:
    setup = own_redis_sentinel
    old = setup.master()
    (replica,) = [server for server in setup.servers if server is not old]
    with sentinel_client(setup) as sentinel, writer_of(sentinel) as writer:
        writer.set(f"{redis_prefix}:before", "1")
        assert writer.wait(1, 5000) == 1  # the replica has it

        new = setup.kill_master()
        assert new is replica and new is setup.master() and not alive(old)
        assert setup.failover_seconds is not None and setup.failover_seconds < 30
        assert role(new)[0] == "master"
        assert discovered(sentinel) == ("127.0.0.1", new.port)
        # The same client, through the sentinels, reaches the new master (default retries).
        writer.set(f"{redis_prefix}:after", "2")
        with client(new) as conn:
            assert conn.mget(f"{redis_prefix}:before", f"{redis_prefix}:after") == ["1", "2"]

        # The killed master comes back as a replica of the new one and can take over again.
        assert setup.restart_killed() is old
        assert role(old)[:3] == ["slave", "127.0.0.1", new.port]
        with client(old) as conn:
            assert conn.get(f"{redis_prefix}:after") == "2"  # synced
        assert setup.kill_master() is old
        assert discovered(sentinel) == ("127.0.0.1", old.port)
        writer.set(f"{redis_prefix}:again", "3")
        assert writer.get(f"{redis_prefix}:after") == "2"


# --------------------------------------------------------------------------- Cluster


def test_cluster_spreads_keys_over_the_three_masters(
    redis_cluster: RedisClusterSetup, redis_prefix: str
) -> None:
    masters = redis_cluster.masters()
    assert len(masters) == 3 and len(redis_cluster.nodes) == 6
    assert sorted(seeds_of(redis_cluster)) == sorted(f"127.0.0.1:{m.port}" for m in masters)
    keys = [f"{redis_prefix}:{i}" for i in range(60)]
    with cluster_client(redis_cluster) as cluster:
        for key in keys:
            cluster.set(key, key)
        assert [cluster.get(key) for key in keys] == keys
    owners: dict[int, set[str]] = {}
    for key in keys:
        slot = redis_cluster.slot_of(key)
        assert slot == redis_cluster.slot_of(f"{{{key}}}:tagged")  # hash tags
        owner = redis_cluster.master_of_slot(slot)
        assert owner in masters
        assert query(owner.port, "GET", key) == key  # the slot's master has it itself
        owners.setdefault(owner.port, set()).add(key)
    assert len(owners) == 3, "60 keys on fewer than three masters"


def test_cluster_kill_master_of_slot_promotes_its_replica(
    own_redis_cluster: RedisClusterSetup, redis_prefix: str
) -> None:
    setup = own_redis_cluster
    key = f"{redis_prefix}:survivor"
    slot = setup.slot_of(key)
    old = setup.master_of_slot(slot)
    replica = replica_of(setup, old)
    with client(old) as conn:
        conn.set(key, "kept")
        assert conn.wait(1, 0) == 1  # the replica has it

    new, seconds = setup.kill_master_of_slot(slot)
    assert new is replica and new is setup.master_of_slot(slot)
    assert 0 < seconds < 30
    assert not alive(old)
    assert role(new)[0] == "master"
    assert old not in setup.masters() and new in setup.masters() and len(setup.masters()) == 3
    with cluster_client(setup) as cluster:  # one seed is dead: the client tries the next
        assert cluster.get(key) == "kept"
        for i in range(30):  # every slot is served
            cluster.set(f"{redis_prefix}:{i}", i)
        assert cluster.get(f"{redis_prefix}:29") == "29"


def test_cluster_migrate_slot_moves_it_with_its_keys(
    own_redis_cluster: RedisClusterSetup, redis_prefix: str
) -> None:
    setup = own_redis_cluster
    keys = [f"{{{redis_prefix}}}:{i}" for i in range(250)]  # one slot: more than a batch
    slot = setup.slot_of(keys[0])
    source = setup.master_of_slot(slot)
    target = next(master for master in setup.masters() if master is not source)
    with cluster_client(setup) as cluster:
        for key in keys:
            cluster.set(key, key)
        setup.migrate_slot(slot, target)
        assert setup.master_of_slot(slot) is target
        assert query(target.port, "CLUSTER", "COUNTKEYSINSLOT", slot) == len(keys)
        assert query(source.port, "CLUSTER", "COUNTKEYSINSLOT", slot) == 0
        with pytest.raises(MovedError, match=f"^{slot} 127.0.0.1:{target.port}$"):
            query(source.port, "GET", keys[0])
        # The client made before follows the MOVED redirection.
        assert cluster.get(keys[-1]) == keys[-1]
        cluster.set(keys[0], "new")
    assert query(target.port, "GET", keys[0]) == "new"
    replica = replica_of(setup, target)
    poll_until(
        lambda: query(replica.port, "DBSIZE") >= len(keys),
        timeout=5,
        what="the target's replica to have the migrated keys",
    )


def test_cluster_sharded_pubsub_on_the_slot_master(
    redis_cluster: RedisClusterSetup, redis_prefix: str
) -> None:
    channel = f"{redis_prefix}:news"
    node = redis_cluster.master_of_slot(redis_cluster.slot_of(channel))
    other = next(master for master in redis_cluster.masters() if master is not node)
    with client(node) as conn, sharded_pubsub(conn) as pubsub:
        pubsub.ssubscribe(channel)
        first = pubsub.get_sharded_message(timeout=5)
        assert first is not None and first["type"] == "ssubscribe"
        assert conn.spublish(channel, "hello") == 1  # one subscriber
        message = pubsub.get_sharded_message(timeout=5)
        assert message is not None
        assert (message["type"], message["channel"], message["data"]) == (
            "smessage",
            channel,
            "hello",
        )
        with pytest.raises(MovedError, match=f"127.0.0.1:{node.port}$"):  # not the slot's node
            query(other.port, "SPUBLISH", channel, "elsewhere")
    # A cluster client routes SPUBLISH to that node.
    with client(node) as conn, sharded_pubsub(conn) as pubsub:
        pubsub.ssubscribe(channel)
        assert pubsub.get_sharded_message(timeout=5) is not None
        with cluster_client(redis_cluster) as cluster:
            assert cluster.spublish(channel, "routed") == 1
        message = pubsub.get_sharded_message(timeout=5)
        assert message is not None and message["data"] == "routed"
