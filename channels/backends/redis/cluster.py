"""One worker's link to a Redis Cluster: commands through redis-py's ``RedisCluster``,
pub/sub as shard channels (Redis 7: SSUBSCRIBE, SPUBLISH) on the master that owns each
topic's slot, one pub/sub reader (a sharded ``Connection``) per master.

``redis+cluster://[[user]:password@]host:port[,host:port...][?options]``: any nodes of
the cluster, to learn its layout from (``rediss+cluster`` for TLS). A Cluster has only
database 0.

A channel's keys and topic share a hash tag, so each publish script runs on one node and
its SPUBLISH reaches exactly the workers subscribed there: adding masters adds publish
capacity (plain PUBLISH on a Cluster goes to every node, which does not scale).

When the layout changes, each topic moves to its slot's new owner and its channels are
recovered from history (``on_resync``):

* a master fails and its replica takes over: the reader of the old master loses its
  connection (``on_down``); the layout is read again, with backoff, until the slots
  are served by a node that answers, then every topic of the old master is subscribed
  on the new one. Channels the old master wrote get a new epoch there (see
  ``stream_meta.lua``): a gap for their clients, never a silent hole;
* a slot is migrated: the old owner sends SUNSUBSCRIBE for its shard channels
  (``on_moved``), and the same move follows.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.crc import key_slot
from redis.typing import EncodableT

from channels.backends.redis.connection import (
    Connection,
    TopicFilter,
    TopicHandler,
    TopicResync,
    notify_resync,
)
from channels.backends.redis.errors import REDIS_ERRORS, unavailable
from channels.backends.redis.pools import (
    COMMAND_TIMEOUT,
    CONNECT_TIMEOUT,
    DRIVER_INFO,
    address,
    display_name,
)
from channels.broker import BrokerUnavailable
from channels.tasks import Tasks

logger = logging.getLogger(__name__)

CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


class BoundedCluster(RedisCluster):
    """``RedisCluster`` with at most ``limit`` commands at a time: its nodes refuse a
    command once they hold ``max_connections`` (a burst of thousands of subscribes would
    fail); this makes the excess wait instead, as the blocking pool does for one Redis."""

    def __init__(self, *args: Any, limit: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._bound = asyncio.Semaphore(limit)

    async def execute_command(self, *args: EncodableT, **kwargs: Any) -> Any:
        async with self._bound:
            return await super().execute_command(*args, **kwargs)


class ClusterConnection:
    """The ``Connection`` interface over a Redis Cluster (see the module docstring)."""

    sharded = True
    # Reading the layout again after a master was lost: backoff between these bounds.
    relayout_base = 0.1
    relayout_cap = 2.0
    pool_size = 64  # command connections per node

    def __init__(self, url: str, client_name: str) -> None:
        parts = urlsplit(url)
        self.client_name = client_name
        self.name = display_name(url)
        userinfo, at, hosts = parts.netloc.rpartition("@")
        seeds = [ClusterNode(*address(host, "Cluster node")) for host in hosts.split(",") if host]
        if not seeds or parts.path.strip("/") not in ("", "0"):
            raise ValueError(
                f"a Cluster URL is {parts.scheme}://host:port[,host:port...] (database 0 "
                f"only), not {self.name!r}"
            )
        username, _, password = userinfo.partition(":")
        options = {key: float(value) for key, value in parse_qsl(parts.query)}
        # The readers' URL: a node of this cluster, with the same scheme and credentials.
        self._node_url = f"{CLUSTER_SCHEMES[parts.scheme]}://{userinfo}{at}{{}}/0"
        self.redis = BoundedCluster(
            limit=self.pool_size,
            startup_nodes=seeds,
            username=unquote(username) or None,
            password=unquote(password) or None,
            ssl=parts.scheme == "rediss+cluster",
            socket_timeout=options.get("socket_timeout", COMMAND_TIMEOUT),
            socket_connect_timeout=options.get("socket_connect_timeout", CONNECT_TIMEOUT),
            retry=Retry(NoBackoff(), 0),
            max_connections=self.pool_size,
            client_name=client_name,
            driver_info=DRIVER_INFO,  # (pools.py: no package metadata read per connection)
            require_full_coverage=False,
        )
        self._topics: dict[bytes, TopicHandler] = {}
        self._home: dict[bytes, str] = {}  # subscribed topic -> the node it is on
        self._readers: dict[str, Connection] = {}  # node name -> its pub/sub reader
        self._on_resync: TopicResync | None = None
        self._relayout: asyncio.Task[None] | None = None
        self._tasks = Tasks(logger)
        self._started = self._closed = False
        self.reconnects = 0

    @property
    def connected(self) -> bool:
        """Every topic is subscribed on a reader that is connected."""
        return (
            self._started
            and all(self._readers[node].connected for node in set(self._home.values()))
            and len(self._home) == len(self._topics)
        )

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self, on_resync: TopicResync) -> None:
        """Read the layout and subscribe the routed topics; if the cluster cannot be
        reached, start anyway (not ready) and keep trying in the background."""
        self._on_resync = on_resync
        self._started = True
        try:
            await self.redis.initialize()
            await self._place(list(self._topics))
        except (*REDIS_ERRORS, BrokerUnavailable) as exc:
            logger.warning("Redis Cluster %s unavailable at start (%s); retrying", self.name, exc)
            self._layout_changed()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._tasks.cancel()
        for reader in self._readers.values():
            await reader.close()
        await self.redis.aclose()
        self._on_resync = None

    async def ready(self) -> bool:
        if not self.connected:
            return False
        try:
            return bool(await self.redis.ping(target_nodes=RedisCluster.PRIMARIES))
        except REDIS_ERRORS:
            return False

    # -- topics ------------------------------------------------------------------------

    def route(self, topic: bytes, handler: TopicHandler) -> None:
        """Have ``topic`` subscribed from ``start`` on; call it before ``start``."""
        self._topics[topic] = handler

    async def subscribe(
        self, topic: bytes, handler: TopicHandler, then: tuple[Any, ...] | None = None
    ) -> Any:
        """As ``Connection.subscribe``, on the reader of the master of ``topic``'s slot
        (where ``then``'s keys are too: a channel's keys and topic share a hash tag)."""
        if topic in self._topics:
            return None
        self._topics[topic] = handler
        try:
            return (await self._place_one(topic, then))[1]
        except BaseException as exc:
            if self._topics.get(topic) is handler:
                del self._topics[topic]
            self._home.pop(topic, None)
            if isinstance(exc, REDIS_ERRORS):
                self._layout_changed()
                raise unavailable("subscribe", exc) from exc
            raise

    async def unsubscribe(self, topic: bytes) -> None:
        if self._topics.pop(topic, None) is None:
            return
        node = self._home.pop(topic, None)
        if node is not None:
            await self._readers[node].unsubscribe(topic)

    async def publish(self, topic: bytes, payload: bytes) -> None:
        await self.redis.spublish(topic, payload)

    async def run_script(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        return await script(keys=keys, args=args)

    async def subscriber_count(self, topic: bytes) -> int:
        node = self._owner(topic)
        counts = await self.redis.execute_command("PUBSUB SHARDNUMSUB", topic, target_nodes=node)
        return int(counts[0][1]) if counts else 0

    # -- placing topics on their nodes -------------------------------------------------

    async def _place(self, topics: list[bytes]) -> list[bytes]:
        """Subscribe each of ``topics`` on the node that owns its slot now (moving it from
        the one it was on); the topics that moved."""
        return [topic for topic in topics if (await self._place_one(topic))[0]]

    async def _place_one(
        self, topic: bytes, then: tuple[Any, ...] | None = None
    ) -> tuple[bool, Any]:
        """Whether ``topic`` moved, and ``then``'s reply (``Connection.subscribe``)."""
        handler = self._topics.get(topic)
        if handler is None:
            return False, None
        node = self._owner(topic)
        if node is None:
            raise BrokerUnavailable(f"no node serves the slot of {topic!r}")
        old = self._home.get(topic)
        if old == node.name:
            return False, None
        reply = await self._reader(node).subscribe(topic, handler, then)
        self._home[topic] = node.name
        if old is not None:
            await self._readers[old].unsubscribe(topic)
        return old is not None, reply

    def _owner(self, topic: bytes) -> ClusterNode | None:
        """The master serving ``topic``'s slot, as far as this worker knows."""
        return self.redis.nodes_manager.get_node_from_slot(key_slot(topic))

    def _reader(self, node: ClusterNode) -> Connection:
        reader = self._readers.get(node.name)
        if reader is None:
            reader = Connection(
                self._node_url.format(node.name),
                self.client_name,
                sharded=True,
                on_moved=lambda topic: self._layout_changed(),
                on_down=self._layout_changed,
            )
            reader.pool_size = 2
            self._readers[node.name] = reader
            self._tasks.spawn(reader.start(self._resync_of(node.name)), f"start:{node.name}")
        return reader

    def _resync_of(self, node: str) -> TopicResync:
        """The reader of ``node`` reconnected to it: its topics may have missed messages."""

        def resync(which: TopicFilter) -> None:
            self.reconnects += 1
            notify_resync(
                self._on_resync, lambda topic: self._home.get(topic) == node and which(topic)
            )

        return resync

    def _layout_changed(self) -> None:
        """A reader lost its node, a slot moved, or a node refused a topic: read the
        layout again and move what moved (one task at a time)."""
        if self._closed or (self._relayout is not None and not self._relayout.done()):
            return
        self._relayout = self._tasks.spawn(self._follow_layout(), "cluster-relayout")

    async def _follow_layout(self) -> None:
        delay = self.relayout_base
        while not self._closed:
            try:
                await self.redis.nodes_manager.initialize()
                moved = await self._place(list(self._topics))
                if moved:
                    logger.warning(
                        "Redis Cluster %s: %d topics moved to another node", self.name, len(moved)
                    )
                    self.reconnects += 1
                    changed = set(moved)
                    notify_resync(self._on_resync, changed.__contains__)
                await self._drop_idle_readers()
            except (*REDIS_ERRORS, BrokerUnavailable) as exc:
                logger.debug("Redis Cluster %s: layout not settled (%s)", self.name, exc)
            if self.connected:
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.relayout_cap)

    async def _drop_idle_readers(self) -> None:
        """Close the readers of nodes that no topic is on any more (a failed master)."""
        used = set(self._home.values())
        for name in [name for name in self._readers if name not in used]:
            await self._readers.pop(name).close()
