"""The interface every broker implements, and the factory that picks one by URL.

A broker assigns offsets (one sequence per channel for the whole cluster),
keeps history, fans publications out to every worker that subscribed to a
channel, and stores presence; between workers it also carries signals and a small
registry of keys (``signal``, ``register``). The hub is its user, and the LLM relays
use the signals and registry through ``hub.broker``.

Delivery guarantee a broker must give to its handler: the publications of one
channel arrive in offset order. A broker that may have missed some (a lost
connection) says so with ``on_resync``; the hub then recovers from history.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

from channels.publication import Message, Publication, StreamPosition


class BrokerUnavailable(Exception):
    """The broker cannot be reached; nothing was published."""


@dataclass(slots=True)
class HistoryPage:
    """Publications of one channel, oldest first, and the stream's current top."""

    publications: list[Publication]
    position: StreamPosition
    # With ``since``: True when ``publications`` holds every publication after it
    # (same epoch, still inside history) - up to ``limit`` when one was given.
    complete: bool = True


@dataclass(slots=True, frozen=True)
class BrokerOptions:
    history_size: int = 100
    history_ttl: float = 300.0
    # How long a shared broker keeps a channel's epoch and top offset after its last
    # publication (longer than the history, so offsets continue and a client whose
    # position is the top still recovers). The memory broker has its own rule.
    history_meta_ttl: float = 86400.0
    presence_ttl: float = 30.0
    key_prefix: str = "gw"


MessageHandler = Callable[[Message], None]
ResyncHandler = Callable[[], None]
SignalHandler = Callable[[bytes], None]


class Broker(Protocol):
    async def start(
        self,
        on_message: MessageHandler,
        on_resync: ResyncHandler,
        on_signal: SignalHandler | None = None,
    ) -> None:
        """Connect; from now on publications of subscribed channels reach ``on_message``,
        and every worker's ``signal`` reaches ``on_signal``."""

    async def close(self) -> None: ...

    async def ready(self) -> bool:
        """True when the broker is reachable (for ``/readyz``)."""

    async def publish(self, channel: str, data: bytes) -> Publication:
        """Assign the next offset, store in history, fan out. Raises ``BrokerUnavailable``."""

    async def publish_event(self, channel: str, event: str, client: bytes) -> None:
        """Fan out a presence event (join/leave) to subscribers; not stored."""

    async def subscribe(self, channel: str) -> None: ...

    async def unsubscribe(self, channel: str) -> None: ...

    async def history(
        self, channel: str, *, since: StreamPosition | None = None, limit: int | None = None
    ) -> HistoryPage:
        """Without ``since``: the last ``limit`` publications (all kept when None).
        With ``since``: the first ``limit`` publications after it."""

    async def presence_add(self, channel: str, client_id: str, entry: bytes) -> bool:
        """Add or refresh one client's entry (expires after the presence TTL); True when
        it was not there (new, or it had expired)."""

    async def presence_expire(self, channel: str) -> None:
        """Remove the entries whose TTL passed (their worker stopped refreshing them) and
        fan out a ``leave`` for each, once for the whole cluster."""

    async def presence_remove(self, channel: str, client_id: str) -> None: ...

    async def presence(self, channel: str) -> list[bytes]: ...

    async def has_subscribers(self, channel: str) -> bool:
        """Whether any worker of the cluster is subscribed to ``channel`` right now."""

    # -- between workers: not channels, never seen by clients ------------------------

    async def signal(self, data: bytes) -> None:
        """Send ``data`` to the ``on_signal`` of every started broker of the cluster (this
        one's included), best effort: a worker that is disconnected then misses it.
        Raises ``BrokerUnavailable``."""

    async def register(self, key: str, value: bytes, ttl: float) -> None:
        """Set a cluster-wide ``key`` (e.g. which channel a relay publishes to) for
        ``ttl`` seconds; setting it again refreshes it. Raises ``BrokerUnavailable``."""

    async def lookup(self, key: str) -> bytes | None:
        """``key``'s value, None when unset or expired. Raises ``BrokerUnavailable``."""

    async def unregister(self, key: str) -> None: ...


def create_broker(url: str, options: BrokerOptions) -> Broker:
    """Pick the backend by URL scheme; its module is imported only when used."""
    scheme = urlsplit(url).scheme
    backends = {
        "memory": ("channels.backends.memory", "MemoryBroker"),
        "redis": ("channels.backends.redis", "RedisBroker"),
        "rediss": ("channels.backends.redis", "RedisBroker"),
    }
    if scheme not in backends:
        raise ValueError(f"unsupported broker URL scheme {scheme!r} (use memory:// or redis://)")
    module_name, class_name = backends[scheme]
    cls = getattr(importlib.import_module(module_name), class_name)
    broker: Broker = cls(url, options)
    return broker
