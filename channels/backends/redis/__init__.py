"""``redis://``: the backend shared by every worker and pod, over one Redis (redis.asyncio,
hiredis).

* ``connection``: the command pool and the one pub/sub reader of a worker (reconnects,
  resubscribes, routes each topic's messages to its handler);
* ``keys``: the key schema and pub/sub payloads;
* ``scripts`` and the ``.lua`` files: publish, history and presence, each atomic;
* ``broker``, ``presence``, ``signals``: the three protocols of ``channels.broker``.

Delivery guarantees:

* Offsets: one Lua script reads (or creates, with a new random epoch) the meta, increments
  the offset, appends to the stream and PUBLISHes, atomically on the server. Every worker
  agrees on offsets, there are no gaps or duplicates, and a publication is in history
  before anyone can see it live. ``publish_many`` does the same for a list in one script
  call: consecutive offsets, one pub/sub message for them all.
* Order: Redis runs scripts one at a time and delivers one connection's pub/sub messages in
  publish order; the connection's protocol hands them to ``on_message`` synchronously as
  it reads them (``pubsub.py``), so each channel's publications arrive in offset order.
* Pub/sub itself is at-most-once: what is published while this worker's pub/sub connection
  is down is not delivered. The reader then reconnects (exponential backoff with jitter),
  resubscribes every channel, waits for Redis to confirm, and only then calls
  ``on_resync``: the hub recovers every channel from history, so nothing published
  while cut off is lost as long as it is still in history.
* ``publish`` (or ``publish_many``) raising ``BrokerUnavailable`` after a refused
  connection means nothing was published. After a *timeout* it is ambiguous (the script
  may have run) - as for any remote call; the caller cannot tell and a retry may publish
  twice.
* Redis flushed or restarted empty: the meta is gone, the next read or publish creates a
  new epoch. The hub's recovery then finds the old position incomplete and sends a gap.
* A failover (a replica promoted, by Sentinel or a Redis Cluster): replication is
  asynchronous, so the new master may lack the last publications the old one
  acknowledged. Each meta records the replication ID of the master that wrote it; on a
  promoted master (it has a second replication ID) a meta written under another ID gets
  a new epoch at its next read or publish (``stream_meta.lua``): a gap for the clients,
  never an offset handed out twice. A restart that reloads its own persistence keeps the
  epochs (a crash with ``appendfsync everysec`` can lose the last second: use
  ``appendfsync always`` where that matters).

A subscribe returns only once Redis confirmed the SUBSCRIBE, so that a history read made
after it cannot miss a publication that the subscription did not see either.

Every Redis call is bounded by socket timeouts (``CONNECT_TIMEOUT``, ``COMMAND_TIMEOUT``;
``socket_timeout``/``socket_connect_timeout`` in the URL's query override them) and is
never retried by redis-py, so nothing hangs or runs twice when Redis is gone.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from channels.backends.redis.broker import RedisBroker
from channels.backends.redis.cluster import CLUSTER_SCHEMES, ClusterConnection
from channels.backends.redis.connection import Connection
from channels.backends.redis.keys import Keys
from channels.backends.redis.link import Link
from channels.backends.redis.presence import RedisPresence
from channels.backends.redis.scripts import Scripts
from channels.backends.redis.signals import RedisSignals
from channels.broker import Backend, BrokerOptions

__all__ = [
    "ClusterConnection",
    "Connection",
    "Link",
    "RedisBroker",
    "RedisPresence",
    "RedisSignals",
    "create",
]


def create(url: str, options: BrokerOptions) -> Backend:
    """The three sides over one ``Connection`` (a ``ClusterConnection`` for a Redis
    Cluster); ``broker.close()`` closes it."""
    keys = Keys(options.key_prefix)
    connection: Link
    if urlsplit(url).scheme in CLUSTER_SCHEMES:
        connection = ClusterConnection(url, keys.client_name)
    else:
        connection = Connection(url, keys.client_name)
    scripts = Scripts(connection.redis, connection.sharded)
    return Backend(
        RedisBroker(connection, keys, scripts, options),
        RedisPresence(connection, keys, scripts, options),
        RedisSignals(connection, keys),
    )
