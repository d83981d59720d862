"""The state every memory backend of one namespace shares: streams, subscriptions,
presence and the registry. A namespace is to memory backends what one Redis (one key
prefix) is to Redis backends: the cluster they are the workers of."""

from __future__ import annotations

import secrets
import time
import weakref
from collections import deque
from dataclasses import dataclass, field

from channels.broker import MessageHandler, SignalHandler
from channels.publication import Message, PresenceEvent, Publication

# memory://<name> -> its namespace while some backend of it is open (or not collected).
_named: weakref.WeakValueDictionary[str, Namespace] = weakref.WeakValueDictionary()


def namespace(name: str) -> Namespace:
    """The namespace called ``name`` (shared by every backend created with it), or a
    private one when ``name`` is empty."""
    if not name:
        return Namespace("")
    space = _named.get(name)
    if space is None:
        space = _named[name] = Namespace(name)
    return space


def new_epoch() -> str:
    return secrets.token_hex(4)


@dataclass(slots=True)
class Stream:
    expires: float  # time.monotonic() when the history lapses
    epoch: str = field(default_factory=new_epoch)
    offset: int = 0
    publications: deque[Publication] = field(default_factory=deque)


@dataclass(slots=True)
class PresenceEntry:
    entry: bytes
    expires: float  # time.monotonic()


@dataclass(slots=True)
class ChannelPresence:
    # Every ``add`` sets it to its own expiry: once it passed, every entry lapsed unseen and
    # the channel's presence is dropped without a leave, as Redis expires its keys.
    expires: float
    clients: dict[str, PresenceEntry] = field(default_factory=dict)


class Namespace:
    def __init__(self, name: str) -> None:
        self.name = name
        self.streams: dict[str, Stream] = {}
        # channel -> the subscribed brokers' receivers (an insertion-ordered set)
        self.subscribers: dict[str, dict[MessageHandler, None]] = {}
        self.presence: dict[str, ChannelPresence] = {}
        self.registry: dict[str, tuple[bytes, float]] = {}  # key -> (value, expires)
        self.listeners: dict[SignalHandler, None] = {}  # the signals of started backends
        self.backends = 0  # created and not closed yet

    def release(self) -> None:
        """One backend closed; the last one frees a named namespace."""
        self.backends -= 1
        if self.backends <= 0 and self.name and _named.get(self.name) is self:
            del _named[self.name]

    # -- fan-out ---------------------------------------------------------------------

    def deliver(self, channel: str, message: Message) -> None:
        """Hand ``message`` to every broker subscribed to ``channel``, synchronously."""
        for receive in self.subscribers.get(channel, ()):
            receive(message)

    # -- history -----------------------------------------------------------------------

    def stream(self, channel: str, ttl: float) -> Stream:
        """``channel``'s stream, created (a new epoch) when unknown or forgotten."""
        stream = self.streams.get(channel)
        now = time.monotonic()
        if stream is None:
            stream = self.streams[channel] = Stream(now + ttl)
        elif stream.expires <= now:
            self.lapse(channel, stream, now + ttl)
            stream = self.streams.setdefault(channel, Stream(now + ttl))
        return stream

    def lapse(self, channel: str, stream: Stream, expires: float) -> None:
        """Drop a stream's history; forget it entirely when nobody is subscribed."""
        if channel in self.subscribers:
            stream.publications.clear()
            stream.expires = expires
        else:
            del self.streams[channel]

    # -- presence --------------------------------------------------------------------

    def present(self, channel: str, now: float) -> ChannelPresence | None:
        """``channel``'s presence, None when it has none (or it expired as a whole)."""
        held = self.presence.get(channel)
        if held is not None and held.expires <= now:
            del self.presence[channel]
            return None
        return held

    def reap(self, channel: str, now: float) -> None:
        """Remove ``channel``'s lapsed presence entries, fanning out a ``leave`` for each."""
        held = self.present(channel, now)
        if held is None:
            return
        clients = held.clients
        stale = [client_id for client_id, client in clients.items() if client.expires <= now]
        for client_id in stale:
            entry = clients.pop(client_id).entry
            self.deliver(channel, PresenceEvent(channel, "leave", entry))
        if not clients:
            self.presence.pop(channel, None)

    # -- housekeeping ----------------------------------------------------------------

    def sweep(self, history_ttl: float) -> None:
        """Free lapsed history, presence entries and registry keys so memory stays bounded."""
        now = time.monotonic()
        for channel, stream in list(self.streams.items()):
            if stream.expires <= now:
                self.lapse(channel, stream, now + history_ttl)
        for channel in list(self.presence):
            self.reap(channel, now)
        for key, (_, expires) in list(self.registry.items()):
            if expires <= now:
                del self.registry[key]
