"""What the broker, presence and signals use to reach Redis: one server's ``Connection``
(a server, or a Sentinel service's master) or a ``ClusterConnection``."""

from __future__ import annotations

from channels.backends.redis.cluster import ClusterConnection
from channels.backends.redis.connection import Connection

Link = Connection | ClusterConnection
