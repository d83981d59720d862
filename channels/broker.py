"""What a backend provides, as three protocols, and the factory that picks one by URL.

What varies separately is kept apart (as centrifuge separates its Broker and
PresenceManager):

* ``Broker``: publications. Assigns offsets (one sequence per channel for the whole
  cluster), keeps history, fans publications and presence events out to every worker
  that subscribed to a channel.
* ``PresenceStore``: who is in a channel, with entries that expire unless refreshed.
* ``Signals``: between workers, never seen by clients: a broadcast to every worker and a
  small registry of keys (the LLM relays' cross-worker cancel).

A ``Backend`` is one of each over one connection (``Broker.close`` closes it). The hub
is their only user inside the gateway; the rest reaches them through the hub.

Delivery guarantee a broker must give to its handler: the publications of one
channel arrive in offset order. A broker that may have missed some (a lost
connection) says so with ``on_resync``; the hub then recovers from history.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol

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


@dataclass(slots=True, unsafe_hash=True)
class HistoryQuery:
    """What ``Broker.history`` is given: ``since`` and ``limit``. (Its fields ``Final``,
    not ``frozen``: made per subscribe that reads history, see ``StreamPosition``.)"""

    since: Final[StreamPosition | None] = None
    limit: Final[int | None] = None


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
    # How long a publish's idempotency key is remembered (``Broker.publish_once``).
    idempotency_ttl: float = 300.0


MessageHandler = Callable[[Message], None]
ChannelFilter = Callable[[str], bool]
# Called with which channels may have missed messages (the broker reconnected).
ResyncHandler = Callable[[ChannelFilter], None]


def every_channel(channel: str) -> bool:
    return True


SignalHandler = Callable[[bytes], None]


class Broker(Protocol):
    async def start(self, on_message: MessageHandler, on_resync: ResyncHandler) -> None:
        """Connect; from now on publications of subscribed channels reach ``on_message``."""

    async def close(self) -> None:
        """Disconnect, closing the connection shared with presence and signals. Idempotent."""

    async def ready(self) -> bool:
        """True when the broker is reachable (for ``/readyz``)."""

    @property
    def reconnects(self) -> int:
        """How many times the connection was lost and re-established (for metrics)."""

    async def publish(self, channel: str, data: bytes) -> Publication:
        """Assign the next offset, store in history, fan out. Raises ``BrokerUnavailable``."""

    async def publish_many(self, channel: str, datas: list[bytes]) -> list[Publication]:
        """``publish`` each of ``datas`` in one step: consecutive offsets in list order, all
        published or none, nothing of the channel published in between. Subscribers receive
        them in order as for separate publishes. Raises ``BrokerUnavailable``."""

    async def publish_once(self, channel: str, data: bytes, key: str) -> tuple[Publication, bool]:
        """``publish``, unless a publication of ``channel`` was made with the idempotency
        ``key`` within ``idempotency_ttl``: then that one's offset and epoch (with
        ``data``) and False, nothing published. Checked and published atomically (two
        at once publish once). Raises ``BrokerUnavailable``."""

    async def publish_each(self, channels: list[str], data: bytes) -> list[Publication]:
        """``publish`` ``data`` to each of ``channels`` (in order), in one round trip per
        server where the backend can; the publications in the order of ``channels``.
        Raises ``BrokerUnavailable`` when any failed (the others may be published)."""

    async def publish_event(self, channel: str, event: str, client: bytes) -> None:
        """Fan out a presence event (join/leave) to subscribers; not stored."""

    async def subscribe(self, channel: str, read: HistoryQuery | None = None) -> HistoryPage | None:
        """Returns once the subscription is live: a history read made after it cannot miss
        a publication that the subscription did not see either. With ``read``, a backend
        that can make that read in the same round trip returns its page; None: read apart."""

    async def unsubscribe(self, channel: str) -> None: ...

    async def has_subscribers(self, channel: str) -> bool:
        """Whether any worker of the cluster is subscribed to ``channel`` right now."""

    async def history(
        self, channel: str, *, since: StreamPosition | None = None, limit: int | None = None
    ) -> HistoryPage:
        """Without ``since``: the last ``limit`` publications (all kept when None).
        With ``since``: the first ``limit`` publications after it."""


class PresenceStore(Protocol):
    """Entries expire ``presence_ttl`` after their last ``add`` (their worker refreshes them
    while the client is there). Every method raises ``BrokerUnavailable``."""

    async def add(self, channel: str, client_id: str, entry: bytes) -> bool:
        """Add or refresh one client's entry; True when it was not there (new, or it had
        expired and been removed)."""

    async def remove(self, channel: str, client_id: str) -> None:
        """Drop one client's entry, announcing nothing (a refresh's re-add undone)."""

    async def leave(self, channel: str, client_id: str) -> None:
        """Drop one client's entry and fan out its ``leave``, in one step: only when the
        entry was there (one that lapsed had its leave announced when it was removed),
        so that each leave goes out once."""

    async def list(self, channel: str) -> list[bytes]:
        """The live entries (those whose TTL passed are removed, as by ``expire``)."""

    async def expire(self, channel: str) -> None:
        """Remove the entries whose TTL passed (their worker stopped refreshing them) and
        fan out a ``leave`` for each, once for the whole cluster."""


class Signals(Protocol):
    """Between workers: not channels, never seen by clients."""

    def listen(self, handler: SignalHandler) -> None:
        """Have ``handler`` called with every signal of the cluster (this worker's own
        included) while the broker is started; may be called before or after it starts."""

    async def signal(self, data: bytes) -> None:
        """Send ``data`` to the listeners of every started worker (this one's included),
        best effort: a worker that is disconnected then misses it.
        Raises ``BrokerUnavailable``."""

    async def register(self, key: str, value: bytes, ttl: float) -> None:
        """Set a cluster-wide ``key`` (e.g. which channel a relay publishes to) for
        ``ttl`` seconds; setting it again refreshes it. Raises ``BrokerUnavailable``."""

    async def lookup(self, key: str) -> bytes | None:
        """``key``'s value, None when unset or expired. Raises ``BrokerUnavailable``."""

    async def unregister(self, key: str) -> None: ...


@dataclass(slots=True, frozen=True)
class Backend:
    """One backend's three sides, sharing one connection (``broker.close`` closes it)."""

    broker: Broker
    presence: PresenceStore
    signals: Signals
