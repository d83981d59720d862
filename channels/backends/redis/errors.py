"""What a Redis call raises when Redis cannot answer, and the ``BrokerUnavailable`` it
becomes for the hub (HTTP 503, an error reply)."""

from __future__ import annotations

import logging

from redis.exceptions import ClusterError, ReadOnlyError, RedisClusterException, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from channels.broker import BrokerUnavailable

logger = logging.getLogger(__name__)

# A Cluster without a node for a slot raises the one that is not a RedisError.
REDIS_ERRORS = (RedisError, RedisClusterException, OSError)


def unavailable(operation: str, exc: BaseException) -> BrokerUnavailable:
    """``BrokerUnavailable`` for ``exc``; errors that are not about reachability are logged,
    since they point at a bug or a misconfigured Redis rather than an outage."""
    outage = (
        RedisConnectionError,
        RedisTimeoutError,
        OSError,
        TimeoutError,
        BrokerUnavailable,
        ClusterError,  # a Cluster failing over: CLUSTERDOWN, TRYAGAIN
        RedisClusterException,  # no node known for a slot
        ReadOnlyError,  # a master just demoted
    )
    if not isinstance(exc, outage):
        logger.error("Redis %s failed: %r", operation, exc)
    return BrokerUnavailable(f"Redis {operation} failed: {exc}")
