"""Real Redis topologies for the tests, on free ports of 127.0.0.1, without persistence.

- ``RedisShards``: N independent redis-servers (``url``: their URLs, comma-separated).
- ``RedisSentinelSetup``: a master, a replica and three sentinels watching ``gwmaster``,
  tuned to fail over in a few seconds (``kill_master()``).
- ``RedisClusterSetup``: a Redis Cluster of three masters with a replica each, built by
  ``redis-cli --cluster create`` (``kill_master_of_slot()``, ``migrate_slot()``).

Every ``start()`` launches the processes in parallel, then polls (with a deadline) until
the whole topology is ready, so a test starts on a settled setup; a failed start stops
what it started. The servers are ``RedisServer``s (tests/redis_server.py); commands here
go through short-lived redis-py connections that never retry (a dead node fails at once).
"""

from __future__ import annotations

import logging
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.retry import Retry

from loadtest.ports import free_port
from tests.redis_server import (
    RedisServer,
    log_text,
    poll_until,
    redis_server_binary,
    spawn,
    wait_for_ping,
)

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
SLOTS = 16384
# Every server may become a master: replicas sync at once (no 5 s wait for more replicas).
SERVER_ARGS = ["--repl-diskless-sync-delay", "0"]


def query(port: int, *args: str | int, timeout: float = 2.0) -> Any:
    """One command to 127.0.0.1:``port``; the reply decoded, as redis-py returns it."""
    with redis.Redis(
        HOST,
        port,
        decode_responses=True,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        driver_info=None,  # no CLIENT SETINFO round trips
    ) as client:
        return client.execute_command(*args)


def attempt(port: int, *args: str | int) -> Any:
    """``query``, or None when the node does not answer (down, loading, ...)."""
    try:
        return query(port, *args)
    except (redis.RedisError, OSError):
        return None


def fields(text: str) -> dict[str, str]:
    """``key:value`` lines (INFO, CLUSTER INFO) as a dict."""
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {key: value.strip() for key, value in pairs}


def alive(server: RedisServer) -> bool:
    return server.proc is not None and server.proc.poll() is None


def launch_all(servers: list[RedisServer], timeout: float = 10.0) -> None:
    """Start ``servers`` in parallel; return when all answer PING."""
    for server in servers:
        server.launch()
    for server in servers:
        server.wait_ready(timeout)


def replica_linked(server: RedisServer) -> bool:
    info = attempt(server.port, "INFO", "replication")
    return isinstance(info, dict) and info.get("master_link_status") == "up"


class RedisShards:
    """``count`` independent redis-servers, e.g. for a broker sharding channels itself."""

    def __init__(self, count: int = 2) -> None:
        self.servers = [RedisServer() for _ in range(count)]

    @property
    def url(self) -> str:
        return ",".join(server.url for server in self.servers)

    def start(self, timeout: float = 10.0) -> RedisShards:
        try:
            launch_all(self.servers, timeout)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        for server in self.servers:
            server.close()


# --------------------------------------------------------------------------- Sentinel


# Sentinel's internal timers (``SENTINEL DEBUG``, Redis 7), in ms, shortened from 1000 (ping,
# ask), 2000 (publish) and 10000 (info): a sentinel retries a refused connection after a
# ping period (they start at once: the first misses the others), asks its peers whether
# the master is down every ask period, tells them a new master every publish period, and
# reads a replica's link state every info period. Not below 300 for ping: while the master
# is down, a replica whose INFO (read every 1000 ms then, whatever the setting) is older
# than 5 ping periods cannot be promoted (-failover-abort-no-good-slave, a 4 s retry).
# A sentinel paused for more than 2 s (a loaded machine) stops acting for the tilt
# period: 5 s, not 30.
SENTINEL_TIMERS = [
    "ping-period",
    "300",
    "ask-period",
    "100",
    "publish-period",
    "200",
    "info-period",
    "1000",
    "tilt-period",
    "5000",
]


def flags(entry: dict[str, Any]) -> set[str]:
    """The ``flags`` of a SENTINEL MASTER (REPLICAS, SENTINELS) entry: s_down, ..."""
    return set(str(entry["flags"]).split(","))


def pairs(reply: dict[str, Any] | list[Any]) -> dict[str, Any]:
    """A SENTINEL MASTER (REPLICAS, SENTINELS) entry as a dict: redis-py's parsing of the
    ``SENTINEL`` command, or the flat ``[key, value, ...]`` list it may leave."""
    if isinstance(reply, dict):
        return reply
    return dict(zip(reply[::2], reply[1::2], strict=True))


class SentinelProcess:
    """``redis-server sentinel.conf --sentinel``: its own directory, as sentinels rewrite
    their config file (epochs, replicas and sentinels they learn)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.myid = secrets.token_hex(20)  # 40 hex digits, so peers can be configured
        self.dir = Path(tempfile.mkdtemp(prefix="redis-sentinel-"))
        self.config = self.dir / "sentinel.conf"
        self.log = self.dir / "sentinel.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def launch(self, config: str) -> None:
        self.config.write_text(config)
        self.proc = spawn([redis_server_binary(), str(self.config), "--sentinel"], self.log)

    def wait_ready(self, timeout: float = 10.0) -> None:
        if self.proc is None:
            raise RuntimeError("sentinel not launched")
        wait_for_ping(self.proc, self.port, self.log, timeout)

    def output(self) -> str:
        return log_text(self.log)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


class RedisSentinelSetup:
    """A master, its replica and three sentinels (quorum 2) watching ``service_name``.

    A master is down after 500 ms without a reply; the sentinels then elect a leader,
    which promotes the replica. The sentinels are told about each other and the replica
    in their config files (``known-sentinel``, ``known-replica``), as they would write
    them themselves: no waiting for the 2 s hello messages at start-up.
    """

    service_name = "gwmaster"
    down_after_ms = 500
    failover_timeout_ms = 2000

    def __init__(self) -> None:
        master = RedisServer(extra_args=SERVER_ARGS)
        replica = RedisServer(extra_args=[*SERVER_ARGS, "--replicaof", HOST, str(master.port)])
        self.servers = [master, replica]
        self.sentinels = [SentinelProcess(free_port()) for _ in range(3)]
        self.killed: RedisServer | None = None  # by kill_master(), for restart_killed()
        self.failover_seconds: float | None = None  # of the last kill_master()

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        return [(HOST, sentinel.port) for sentinel in self.sentinels]

    @property
    def url(self) -> str:
        hosts = ",".join(f"{host}:{port}" for host, port in self.sentinel_addresses)
        return f"redis+sentinel://{hosts}/{self.service_name}/0"

    def sentinel_config(self, sentinel: SentinelProcess) -> str:
        name = self.service_name
        master, replica = self.servers
        lines = [
            f"port {sentinel.port}",
            f"bind {HOST}",
            f"dir {sentinel.dir}",
            "loglevel notice",  # +sdown, +odown, +switch-master: worth reading on failure
            f"sentinel myid {sentinel.myid}",
            f"sentinel monitor {name} {HOST} {master.port} 2",
            f"sentinel down-after-milliseconds {name} {self.down_after_ms}",
            f"sentinel failover-timeout {name} {self.failover_timeout_ms}",
            f"sentinel parallel-syncs {name} 1",
            f"sentinel known-replica {name} {HOST} {replica.port}",
        ]
        lines += [
            f"sentinel known-sentinel {name} {HOST} {other.port} {other.myid}"
            for other in self.sentinels
            if other is not sentinel
        ]
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 10.0) -> RedisSentinelSetup:
        started = time.monotonic()
        try:
            master, replica = self.servers
            # The master first: a replica that finds no master retries a second later.
            master.start(timeout)
            replica.start(timeout)
            # Sentinels read the replica's link state when they connect: link it first.
            poll_until(
                lambda: replica_linked(replica),
                timeout=timeout,
                what=f"replica {replica.port} to sync with master {master.port}",
                details=lambda: replica.output() + master.output(),
            )
            for sentinel in self.sentinels:
                sentinel.launch(self.sentinel_config(sentinel))
            for sentinel in self.sentinels:
                sentinel.wait_ready(timeout)
                try:
                    query(sentinel.port, "SENTINEL", "DEBUG", *SENTINEL_TIMERS)
                except redis.ResponseError as exc:
                    raise RuntimeError(f"the sentinel tests need Redis 7 or later: {exc}") from exc
            self.wait_settled(master, [replica], timeout)
        except BaseException:
            self.close()
            raise
        log.info("sentinel setup ready in %.2fs", time.monotonic() - started)
        return self

    def sentinel_view(self, sentinel: SentinelProcess) -> dict[str, Any] | None:
        """What one sentinel knows of the service: master, replicas, other sentinels."""
        master = attempt(sentinel.port, "SENTINEL", "MASTER", self.service_name)
        replicas = attempt(sentinel.port, "SENTINEL", "REPLICAS", self.service_name)
        others = attempt(sentinel.port, "SENTINEL", "SENTINELS", self.service_name)
        if master is None or replicas is None or others is None:
            return None
        return {
            "master": pairs(master),
            "replicas": [pairs(entry) for entry in replicas],
            "sentinels": [pairs(entry) for entry in others],
        }

    def wait_settled(
        self, master: RedisServer, replicas: list[RedisServer], timeout: float
    ) -> None:
        """Until every sentinel sees ``master`` up, ``replicas`` linked and the other two."""
        views: dict[int, Any] = {}

        def settled(sentinel: SentinelProcess) -> bool:
            view = views[sentinel.port] = self.sentinel_view(sentinel)
            if view is None:
                return False
            linked = {
                int(entry["port"])
                for entry in view["replicas"]
                if flags(entry) == {"slave"} and entry["master-link-status"] == "ok"
            }
            return (
                flags(view["master"]) == {"master"}
                and int(view["master"]["port"]) == master.port
                and linked >= {replica.port for replica in replicas}
                and int(view["master"]["num-other-sentinels"]) == 2
                # master_down: what that sentinel said of a master, maybe a killed one
                and all(
                    flags(entry) - {"master_down"} == {"sentinel"} for entry in view["sentinels"]
                )
            )

        poll_until(
            lambda: all(settled(sentinel) for sentinel in self.sentinels),
            timeout=timeout,
            what=f"the sentinels to see master {master.port} with replicas "
            f"{[replica.port for replica in replicas]} and each other",
            details=lambda: f"their views: {views}\n{self.sentinels[0].output()}",
        )

    def master_address(self) -> tuple[str, int]:
        """``SENTINEL get-master-addr-by-name``, from the first sentinel that answers."""
        for sentinel in self.sentinels:
            reply = attempt(sentinel.port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service_name)
            if reply:
                return str(reply[0]), int(reply[1])
        raise RuntimeError(f"no sentinel answers for {self.service_name}")

    def server_on(self, port: int) -> RedisServer:
        for server in self.servers:
            if server.port == port:
                return server
        raise RuntimeError(f"the sentinels name a master on port {port}, not one of ours")

    def master(self) -> RedisServer:
        """The server the sentinels currently name master."""
        return self.server_on(self.master_address()[1])

    def kill_master(self, timeout: float = 30.0) -> RedisServer:
        """SIGKILL the master; return the replica promoted in its place once all three
        sentinels name it and it answers ROLE as master (``failover_seconds`` set)."""
        old = self.master()
        started = time.monotonic()
        old.stop()  # SIGKILL
        self.killed = old
        answers: list[Any] = []

        def promoted() -> RedisServer | None:
            answers[:] = [
                attempt(s.port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service_name)
                for s in self.sentinels
            ]
            ports = {int(answer[1]) if answer else None for answer in answers}
            if len(ports) != 1 or None in ports or old.port in ports:
                return None
            new = self.server_on(ports.pop() or 0)
            role = attempt(new.port, "ROLE")
            return new if role and role[0] == "master" else None

        new = poll_until(
            promoted,
            timeout=timeout,
            what=f"the sentinels to fail over from master {old.port}",
            details=lambda: (
                f"sentinels answer {answers}\n"
                + "\n".join(sentinel.output() for sentinel in self.sentinels)
            ),
        )
        self.failover_seconds = time.monotonic() - started
        log.info("sentinel failover %d -> %d in %.2fs", old.port, new.port, self.failover_seconds)
        return new

    def restart_killed(self, timeout: float = 10.0) -> RedisServer:
        """Start the master ``kill_master()`` killed again, as a replica of the current
        master (empty: it syncs); return once it is linked and every sentinel sees it."""
        if self.killed is None:
            raise RuntimeError("no master killed to restart")
        server, master = self.killed, self.master()
        server.extra_args = [*SERVER_ARGS, "--replicaof", HOST, str(master.port)]
        server.start(timeout)
        poll_until(
            lambda: replica_linked(server),
            timeout=timeout,
            what=f"restarted {server.port} to sync with master {master.port}",
            details=server.output,
        )
        self.wait_settled(master, [server], timeout)
        self.killed = None
        return server

    def close(self) -> None:
        for sentinel in self.sentinels:
            sentinel.close()
        for server in self.servers:
            server.close()


# --------------------------------------------------------------------------- Cluster


@dataclass
class NodeEntry:
    """One line of ``CLUSTER NODES``: a node as one member of the cluster sees it."""

    id: str
    port: int  # 0 while the address is unknown (handshake)
    flags: set[str]
    master_id: str | None  # of a replica
    slots: list[tuple[int, int]]  # ranges, inclusive; not the ones in migration

    @property
    def is_master(self) -> bool:
        return "master" in self.flags

    @property
    def failed(self) -> bool:
        return bool(self.flags & {"fail", "fail?", "handshake", "noaddr"})

    def owns(self, slot: int) -> bool:
        return any(first <= slot <= last for first, last in self.slots)


def parse_nodes(text: str) -> list[NodeEntry]:
    nodes = []
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = line.split()
        node_id, address, node_flags, master = parts[:4]
        host_port = address.split("@")[0]  # 127.0.0.1:7000@17000[,hostname]
        slots = []
        for entry in parts[8:]:
            if entry.startswith("["):  # [slot->-id] migrating, [slot-<-id] importing
                continue
            first, _, last = entry.partition("-")
            slots.append((int(first), int(last or first)))
        nodes.append(
            NodeEntry(
                id=node_id,
                port=int(host_port.rpartition(":")[2] or 0),
                flags=set(node_flags.split(",")),
                master_id=None if master == "-" else master,
                slots=slots,
            )
        )
    return nodes


def myself(view: list[NodeEntry]) -> NodeEntry:
    """The node that gave ``view``."""
    return next(entry for entry in view if "myself" in entry.flags)


def redis_cli_binary() -> str:
    found = shutil.which("redis-cli") or str(Path(redis_server_binary()).with_name("redis-cli"))
    if not Path(found).is_file():
        raise RuntimeError(
            "the Redis Cluster tests need redis-cli (`apt-get install redis-tools`), "
            "to create the cluster"
        )
    return found


class RedisClusterSetup:
    """Three masters with one replica each, in one Redis Cluster.

    A node unreachable for ``node_timeout_ms`` is failing; its replica is promoted a
    second or two later. ``cluster-require-full-coverage no``: while one master is down,
    the slots of the others stay served, as a broker test would want to see.
    """

    node_timeout_ms = 1000

    def __init__(self) -> None:
        self.nodes: list[RedisServer] = []
        for _ in range(6):
            node = RedisServer(extra_args=SERVER_ARGS)
            node.extra_args += [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                str(Path(node.dir) / "nodes.conf"),
                "--cluster-port",  # else port + 10000: maybe taken, or above 65535
                str(free_port()),
                "--cluster-node-timeout",
                str(self.node_timeout_ms),
                "--cluster-require-full-coverage",
                "no",
            ]
            self.nodes.append(node)
        self.seeds = self.nodes[:3]  # the masters once started

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"{HOST}:{node.port}" for node in self.seeds)

    def start(self, timeout: float = 20.0) -> RedisClusterSetup:
        started = time.monotonic()
        try:
            launch_all(self.nodes, timeout)
            create = subprocess.run(
                [
                    redis_cli_binary(),
                    "--cluster",
                    "create",
                    *(f"{HOST}:{node.port}" for node in self.nodes),
                    "--cluster-replicas",
                    "1",
                    "--cluster-yes",
                ],
                capture_output=True,
                text=True,
                timeout=timeout,
            )
            if create.returncode != 0:
                raise RuntimeError(
                    f"redis-cli --cluster create failed ({create.returncode}):\n"
                    f"{create.stdout}{create.stderr}"
                )
            self.wait_ok(self.nodes, timeout)
            self.seeds = self.masters()
        except BaseException:
            self.close()
            raise
        log.info("cluster ready in %.2fs", time.monotonic() - started)
        return self

    # The cluster as its nodes see it.

    def view(self, node: RedisServer) -> list[NodeEntry] | None:
        text = attempt(node.port, "CLUSTER", "NODES")
        return parse_nodes(text) if isinstance(text, str) else None

    def current_view(self) -> list[NodeEntry]:
        """``CLUSTER NODES`` from the first live node that answers."""
        for node in self.nodes:
            if alive(node) and (view := self.view(node)) is not None:
                return view
        raise RuntimeError("no cluster node answers CLUSTER NODES")

    def node_on(self, port: int) -> RedisServer:
        for node in self.nodes:
            if node.port == port:
                return node
        raise RuntimeError(f"the cluster names a node on port {port}, not one of ours")

    def masters(self) -> list[RedisServer]:
        """The masters serving slots now (not failed), as ``CLUSTER NODES`` tells."""
        view = self.current_view()
        return [
            self.node_on(entry.port)
            for entry in view
            if entry.is_master and not entry.failed and entry.slots
        ]

    @staticmethod
    def slot_of(key: str) -> int:
        return int(key_slot(key.encode()))

    def owner_entry(self, slot: int, view: list[NodeEntry]) -> NodeEntry:
        for entry in view:
            if entry.is_master and entry.owns(slot):
                return entry
        raise RuntimeError(f"no master owns slot {slot}")

    def master_of_slot(self, slot: int) -> RedisServer:
        return self.node_on(self.owner_entry(slot, self.current_view()).port)

    def wait_ok(
        self, nodes: list[RedisServer], timeout: float, owner: tuple[int, str] | None = None
    ) -> None:
        """Until each of ``nodes`` reports ``cluster_state:ok`` with every slot served by a
        live master, knows the same masters and replicas, each replica linked; ``owner``
        (slot, node id): and each of them sees that node own that slot."""
        states: dict[int, Any] = {}

        def ok(node: RedisServer) -> bool:
            info = attempt(node.port, "CLUSTER", "INFO")
            view = self.view(node)
            states[node.port] = fields(info) if isinstance(info, str) else None
            if not isinstance(info, str) or view is None:
                return False
            state = fields(info)
            live = [entry for entry in view if not entry.failed]
            masters = [entry for entry in live if entry.is_master and entry.slots]
            replicas = [entry for entry in live if "slave" in entry.flags]
            return (
                state["cluster_state"] == "ok"
                and state["cluster_slots_assigned"] == str(SLOTS)
                and state["cluster_slots_ok"] == str(SLOTS)
                and len(masters) == 3
                and len(masters) + len(replicas) == len(nodes)
                and (owner is None or self.owner_entry(owner[0], view).id == owner[1])
                and (myself(view).is_master or replica_linked(node))
            )

        poll_until(
            lambda: all(ok(node) for node in nodes),
            timeout=timeout,
            what=f"cluster nodes {[node.port for node in nodes]} to be ok",
            details=lambda: (
                f"CLUSTER INFO: {states}\n"
                + (self.view_text(nodes[0]) or "")
                + "\n".join(node.output() for node in nodes)
            ),
        )

    def view_text(self, node: RedisServer) -> str | None:
        text = attempt(node.port, "CLUSTER", "NODES")
        return text if isinstance(text, str) else None

    # Changes.

    def kill_master_of_slot(self, slot: int, timeout: float = 30.0) -> tuple[RedisServer, float]:
        """SIGKILL the master of ``slot``; once its replica is promoted and every other
        node reports the cluster ok, all slots served: (that replica, seconds taken)."""
        view = self.current_view()
        victim = self.owner_entry(slot, view)
        replicas = [entry for entry in view if entry.master_id == victim.id and not entry.failed]
        if not replicas:
            raise RuntimeError(f"master {victim.port} of slot {slot} has no live replica")
        started = time.monotonic()
        self.node_on(victim.port).stop()  # SIGKILL
        survivors = [node for node in self.nodes if alive(node)]
        self.wait_ok(survivors, timeout, owner=(slot, replicas[0].id))
        seconds = time.monotonic() - started
        log.info("cluster failover %d -> %d in %.2fs", victim.port, replicas[0].port, seconds)
        return self.node_on(replicas[0].port), seconds

    def migrate_slot(self, slot: int, to: RedisServer, timeout: float = 20.0) -> None:
        """Move ``slot`` and its keys to master ``to`` the way ``redis-cli --cluster
        reshard`` does: IMPORTING, MIGRATING, MIGRATE the keys, SETSLOT NODE everywhere."""
        view = self.current_view()
        source = self.owner_entry(slot, view)
        target = next((entry for entry in view if entry.port == to.port), None)
        if target is None or not target.is_master:
            raise RuntimeError(f"node {to.port} is not a master of the cluster")
        if source.id == target.id:
            return
        query(to.port, "CLUSTER", "SETSLOT", slot, "IMPORTING", source.id)
        query(source.port, "CLUSTER", "SETSLOT", slot, "MIGRATING", target.id)
        while keys := query(source.port, "CLUSTER", "GETKEYSINSLOT", slot, 100):
            query(source.port, "MIGRATE", HOST, to.port, "", 0, 5000, "KEYS", *keys)
        masters = [entry for entry in view if entry.is_master and not entry.failed]
        # The target first, then the source (it stops redirecting with ASK), then the rest.
        for entry in sorted(masters, key=lambda e: (e.id != target.id, e.id != source.id)):
            query(entry.port, "CLUSTER", "SETSLOT", slot, "NODE", target.id)
        self.wait_ok([node for node in self.nodes if alive(node)], timeout, owner=(slot, target.id))

    def close(self) -> None:
        for node in self.nodes:
            node.close()


# Fixtures, made visible to every test module by tests/conftest.py.


@pytest.fixture(scope="session")
def redis_shards() -> Iterator[RedisShards]:
    """Two independent redis-servers for the whole run (keep apart with ``redis_prefix``)."""
    shards = RedisShards(2).start()
    yield shards
    shards.close()


@pytest.fixture
def own_redis_shards() -> Iterator[RedisShards]:
    """Two redis-servers for this test only (to stop or restart them)."""
    shards = RedisShards(2).start()
    yield shards
    shards.close()


@pytest.fixture(scope="session")
def redis_sentinel() -> Iterator[RedisSentinelSetup]:
    """A master, a replica and three sentinels for the whole run: do not kill anything."""
    setup = RedisSentinelSetup().start()
    yield setup
    setup.close()


@pytest.fixture
def own_redis_sentinel() -> Iterator[RedisSentinelSetup]:
    """A sentinel setup for this test only (``kill_master()``, ``restart_killed()``)."""
    setup = RedisSentinelSetup().start()
    yield setup
    setup.close()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterSetup]:
    """A six-node Redis Cluster for the whole run: do not kill or move anything."""
    setup = RedisClusterSetup().start()
    yield setup
    setup.close()


@pytest.fixture
def own_redis_cluster() -> Iterator[RedisClusterSetup]:
    """A Redis Cluster for this test only (``kill_master_of_slot()``, ``migrate_slot()``)."""
    setup = RedisClusterSetup().start()
    yield setup
    setup.close()
