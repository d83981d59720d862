"""The backend a URL names: ``create_backend`` (what ``GATEWAY_BROKER_URL`` means).

Each backend module of ``channels/backends/`` has a ``create(url, options) -> Backend``
and is imported only when its scheme is used. Several URLs, comma-separated, are the
shards of one backend (``channels.backends.sharded``). The gateway uses this and the
hub, never a backend module itself.
"""

from __future__ import annotations

import importlib
import re
from urllib.parse import urlsplit

from channels.backends import sharded
from channels.broker import Backend, BrokerOptions

# URL scheme -> the module whose ``create(url, options)`` makes the backend.
_BACKENDS = {
    "memory": "channels.backends.memory",
    "redis": "channels.backends.redis",
    "rediss": "channels.backends.redis",
    "redis+sentinel": "channels.backends.redis",
    "rediss+sentinel": "channels.backends.redis",
    "redis+cluster": "channels.backends.redis",
    "rediss+cluster": "channels.backends.redis",
}
# What may be a shard: memory:// lives in one process, a Redis Cluster shards itself.
_SHARDABLE = {"redis", "rediss", "redis+sentinel", "rediss+sentinel"}
# Where one URL of a list ends: a comma followed by a scheme (a Sentinel URL has commas
# of its own, between its addresses).
_NEXT_URL = re.compile(r",\s*(?=[A-Za-z][A-Za-z0-9+.-]*://)")


def split_urls(url: str) -> list[str]:
    """``url`` as a list: one URL, or several separated by commas (shards)."""
    return [part.strip() for part in _NEXT_URL.split(url.strip())]


def create_backend(url: str, options: BrokerOptions) -> Backend:
    """The backend ``url`` names (see the module docstring)."""
    urls = split_urls(url)
    if len(urls) > 1:
        if any(urlsplit(u).scheme not in _SHARDABLE for u in urls):
            raise ValueError(
                "shards are a list of redis://, rediss:// or redis+sentinel:// URLs "
                "(memory:// lives in one process and cannot be sharded; a Redis Cluster "
                "shards itself)"
            )
        return sharded.combine([create_backend(u, options) for u in urls])
    scheme = urlsplit(url).scheme
    if scheme not in _BACKENDS:
        raise ValueError(
            f"unsupported broker URL scheme {scheme!r} "
            "(use memory://, redis://, rediss://, redis+sentinel:// or redis+cluster://)"
        )
    module = importlib.import_module(_BACKENDS[scheme])
    backend: Backend = module.create(url, options)
    return backend
