"""A Sentinel service's master, watched: when the Sentinels name another one, every
connection of the worker to the old one is closed, so that it reconnects to the new one.

redis-py asks the Sentinels where the master is when a connection opens, and not again:
connections that stay open stay on the old master. After a Redis crash they break and
reopen by themselves, but in a planned failover (``SENTINEL FAILOVER``, an operator's
or an upgrade's) the old master goes on answering, as a master, until the Sentinels
turn it into a replica - up to their INFO period (10 s) later. Meanwhile the worker's
pub/sub connection hears none of the new master's publications and its publishes land
on the old master, to be thrown away when it becomes a replica: ten seconds of
acknowledged publications (and their idempotency keys) lost, and of presence
refreshes, against the moment of the switch here (``INTERVAL``).

The Sentinels are asked every ``INTERVAL`` (``SENTINEL MASTERS`` on the first that
answers, redis-py's ``discover_master``), by a task of its own: a Sentinel that does not
answer delays nothing else.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from redis.asyncio.connection import ConnectionPool
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError

from channels.backends.redis.errors import REDIS_ERRORS
from channels.backends.redis.pubsub import PubSubLink

logger = logging.getLogger(__name__)

INTERVAL = 1.0

Address = tuple[str, int]


def master_watch(
    pool: ConnectionPool, link: Callable[[], PubSubLink | None], interval: float = INTERVAL
) -> Coroutine[Any, Any, None] | None:
    """The watch of ``pool``'s master, to run as a task (None when ``pool`` is not a
    Sentinel service's). ``link()`` is the worker's pub/sub connection (None while it
    is down): when it, or the pool's last new connection, is not on the master the
    Sentinels name, every connection of the pool is closed and the link ended (its
    reader reconnects, and resyncs)."""
    if not isinstance(pool, SentinelConnectionPool):
        return None
    return _watch(pool, link, interval)


async def _watch(
    pool: SentinelConnectionPool, link: Callable[[], PubSubLink | None], interval: float
) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            master: Address = await pool.sentinel_manager.discover_master(pool.service_name)
        except REDIS_ERRORS:  # no Sentinel answers, or none names a master: not our call
            continue
        linked = link()
        on = None if linked is None else linked.address
        known = pool.master_address  # where the pool's last new connection went
        if (on is None or on == master) and (known is None or known == master):
            continue
        was = on or known
        logger.warning(
            "Sentinel names %s:%d the master of %r (connected to %s:%d): reconnecting",
            *master,
            pool.service_name,
            *(was if was is not None else ("?", 0)),
        )
        try:
            await pool.disconnect(inuse_connections=True)  # their calls fail: 503, retried
        except REDIS_ERRORS as exc:
            logger.debug("closing the old master's connections: %s", exc)
        pool.master_address = master  # (said once, not again until a connection asks)
        if linked is not None:
            linked.fail(RedisConnectionError("the master moved"))
