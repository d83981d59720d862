"""``memory://``: the embedded backend, for one process.

``memory://`` gets a namespace of its own (one process, one hub: what a gateway with
the memory broker runs). ``memory://<name>`` shares one namespace with every backend
of the process created with the same name, while one of them is open: several hubs
then behave like the workers of one cluster (one sequence of offsets per channel,
every publication fanned out to each, presence, signals and the registry shared).

Offsets are assigned and fanned out synchronously inside ``publish`` (no await
between the two), so each handler sees a channel's publications in offset order and
a publication is in history before anyone can see it live.

History of a channel is dropped ``history_ttl`` seconds (the publisher's) after its
last publication. Its epoch and offset survive while some backend of the namespace
is subscribed to it (later publications continue the sequence); a channel nobody
subscribes to is forgotten entirely and starts a new epoch next time.

Presence behaves as the Redis one: an entry lapses ``presence_ttl`` after its last
``add``; ``list`` and ``expire`` (and the periodic sweep) remove lapsed entries and
fan out one ``leave`` each. A channel none of whose entries was refreshed within the
TTL loses them all without a leave, as Redis expires the channel's keys.

Signals are delivered with ``loop.call_soon`` to every started backend of the
namespace, the sender's included.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from channels.backends.memory.broker import MemoryBroker
from channels.backends.memory.namespace import namespace
from channels.backends.memory.presence import MemoryPresence
from channels.backends.memory.signals import MemorySignals
from channels.broker import Backend, BrokerOptions

__all__ = ["MemoryBroker", "MemoryPresence", "MemorySignals", "create"]


def create(url: str, options: BrokerOptions) -> Backend:
    space = namespace(urlsplit(url).netloc)
    signals = MemorySignals(space)
    return Backend(MemoryBroker(space, options, signals), MemoryPresence(space, options), signals)
