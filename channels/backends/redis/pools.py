"""The connection pool of one Redis, by URL: a server, or the master of a Sentinel service.

* ``redis://[[user]:password@]host:port/db`` and ``rediss://`` (TLS): redis-py's URL form,
  query options included (``socket_timeout``, ``socket_connect_timeout``, ...).
* ``redis+sentinel://[[user]:password@]host:port[,host:port...]/service[/db]``: the
  master of ``service`` as the Sentinels at those addresses name it (``rediss+sentinel``
  for TLS to the master). A connection asks them where the master is each time it
  connects, so after a failover the reconnects reach the new one. The password is the
  master's; ``?sentinel_password=`` is the Sentinels' own when they require one.
  The same query options apply, to the Sentinels too.

Every pool blocks a caller while all its connections are busy (a burst of thousands of
subscribes waits for a free connection instead of opening one socket each), and no
command is retried by redis-py (nothing runs twice when Redis is gone).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import redis
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import ConnectionPool
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.driver_info import DriverInfo
from redis.maint_notifications import MaintNotificationsConfig

DRIVER_INFO = DriverInfo(name="redis-py", lib_version=redis.__version__)
CONNECT_TIMEOUT = 2.0
COMMAND_TIMEOUT = 5.0
SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}  # -> TLS to the master


class BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """Sentinel's master discovery with the blocking pool's wait for a free connection
    (redis-py has the two separately; the Sentinel pool raises when it is full)."""


def _options(client_name: str, max_connections: int) -> dict[str, Any]:
    return {
        "max_connections": max_connections,
        "timeout": COMMAND_TIMEOUT,  # waiting for a free connection
        "socket_timeout": COMMAND_TIMEOUT,
        "socket_connect_timeout": CONNECT_TIMEOUT,
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 0,
        "decode_responses": False,
        "client_name": client_name,
        # With maintenance notifications on ("auto", the default under RESP3), redis-py
        # 8.1 skips its check-out probe and hands out pooled connections the server
        # closed (after a Redis restart the first command fails): redis/redis-py#4252.
        "maint_notifications_config": MaintNotificationsConfig(enabled=False),
        # What CLIENT SETINFO tells Redis, as redis-py would, but given: left to itself it
        # reads and parses its package metadata for every new connection (~0.3 ms each,
        # the pool growing under a crowd, every reconnect after a failover).
        "driver_info": DRIVER_INFO,
    }


def command_pool(url: str, client_name: str, max_connections: int) -> ConnectionPool:
    """The pool for ``url`` (see the module docstring for the forms)."""
    scheme = urlsplit(url).scheme
    if scheme not in SENTINEL_SCHEMES:
        pool: ConnectionPool = BlockingConnectionPool.from_url(
            url, **_options(client_name, max_connections)
        )
        return pool
    return _sentinel_pool(url, client_name, max_connections)


def _sentinel_pool(url: str, client_name: str, max_connections: int) -> ConnectionPool:
    parts = urlsplit(url)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    addresses = [address(host, "Sentinel") for host in hosts.split(",") if host]
    path = [p for p in parts.path.split("/") if p]
    if not addresses or not 1 <= len(path) <= 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError(
            f"a Sentinel URL is {parts.scheme}://host:port[,host:port...]/service[/db], "
            f"not {display_name(url)!r}"
        )
    service, db = path[0], int(path[1]) if len(path) == 2 else 0
    query: dict[str, Any] = dict(parse_qsl(parts.query))
    sentinel_password = query.pop("sentinel_password", None)
    options = _options(client_name, max_connections)
    for key in ("socket_timeout", "socket_connect_timeout"):
        if key in query:
            options[key] = float(query.pop(key))
    options.update(query)
    username, _, password = userinfo.partition(":")
    master: dict[str, Any] = {
        key: value
        for key, value in options.items()
        if key not in ("max_connections", "timeout", "maint_notifications_config")
    }
    master.update(db=db, username=unquote(username) or None, password=unquote(password) or None)
    sentinel_options = {
        "socket_timeout": options["socket_timeout"],
        "socket_connect_timeout": options["socket_connect_timeout"],
        "retry": Retry(NoBackoff(), 0),
        "password": sentinel_password,
    }
    sentinel = Sentinel(addresses, sentinel_kwargs=sentinel_options)  # type: ignore[no-untyped-call]
    return BlockingSentinelPool(  # type: ignore[no-untyped-call]
        unquote(service),
        sentinel,
        max_connections=max_connections,
        timeout=options["timeout"],
        ssl=SENTINEL_SCHEMES[parts.scheme],
        maint_notifications_config=options["maint_notifications_config"],
        **master,
    )


async def close(redis: Redis) -> None:
    """Close ``redis`` with its pool, and a Sentinel pool's connections to the Sentinels."""
    pool = redis.connection_pool
    await redis.aclose()
    if isinstance(pool, SentinelConnectionPool):
        await pool.sentinel_manager.aclose()


def address(host: str, what: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port``) of a URL's address list; ValueError naming ``what``."""
    name, _, port = host.rpartition(":")
    if not name or not port.isdigit():
        raise ValueError(f"a {what} address is host:port, not {host!r}")
    return name.strip("[]"), int(port)


def display_name(url: str) -> str:
    """``url`` without its password, for logs."""
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":***"
    netloc = f"{userinfo}@{hosts}" if at else hosts
    return f"{parts.scheme}://{netloc}{parts.path}"
