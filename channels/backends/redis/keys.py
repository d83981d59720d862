"""The key schema. Keys of channel ``C`` under the prefix ``P`` (``BrokerOptions.key_prefix``).

The channel is wrapped in a hash tag: names cannot contain braces, so ``P:h:{a:b}`` and
``P:h:{a}`` never collide, and all keys of one channel share a Redis Cluster slot (the
scripts need that):

* ``P:m:{C}`` hash ``epoch``, ``offset``: the stream's top; ``replid``: the replication ID
  of the master that last wrote it (see ``stream_meta.lua``). Expires ``history_meta_ttl``
  after the last publication - longer than the history on purpose: offsets keep counting
  after the history expired, and a client whose position is the top still recovers.
* ``P:h:{C}`` stream, the last ``history_size`` publications (exact ``MAXLEN``); the entry
  id is ``0-<offset>``, so "everything after N" is ``XRANGE 0-(N+1) +`` (O(log n + k)).
  Fields ``d`` (data) and ``t`` (the publisher's clock). Expires ``history_ttl`` after the
  last publication.
* ``P:p:{C}`` hash client id -> presence entry, ``P:z:{C}`` sorted set client id -> expiry
  (Redis server clock, ms). Both keys expire ``presence_ttl`` after the last refresh.
  An entry whose expiry passed (its worker died) is removed by the next presence read
  or ``expire``, which publishes its ``leave`` in the same script.
* pub/sub topic ``P:t:{C}``: ``p<offset> <epoch> <time> <data>`` for a publication,
  ``e<event> <client>`` for a join or leave, and for the publications of one
  ``publish_many`` (two or more) one message
  ``b<first offset> <epoch> <time> <length>,<length>,… <data><data>…``: the datas
  concatenated, each ``length`` bytes long (decimal), the offsets consecutive from the
  first, one time for all. A worker that predates this kind logs it as malformed and
  drops it; the next publication of the channel then shows it a hole in the offsets and
  it recovers the batch from history (``channels.fanout``).
* ``P:i:{C}:<key>`` string ``<offset> <epoch>``: a publication made with the idempotency
  key ``<key>`` (``publish_once.lua``), expiring ``idempotency_ttl`` after it.
* Between workers: pub/sub topic ``P:signals`` (every worker's reader is subscribed to it
  from the start, whatever its channels), and registry keys ``P:r:{K}`` (plain strings
  with an expiry).
"""

from __future__ import annotations


class Keys:
    __slots__ = ("client_name", "prefix", "signals")

    def __init__(self, prefix: str) -> None:
        if "{" in prefix or "}" in prefix:
            raise ValueError("the Redis key prefix cannot contain '{' or '}'")
        self.prefix = prefix
        self.signals = f"{prefix}:signals".encode()
        self.client_name = f"gateway:{'_'.join(prefix.split())}"  # for CLIENT LIST

    def _key(self, kind: str, name: str) -> str:
        return f"{self.prefix}:{kind}:{{{name}}}"

    def meta(self, channel: str) -> str:
        return self._key("m", channel)

    def history(self, channel: str) -> str:
        return self._key("h", channel)

    def presence(self, channel: str) -> list[str]:
        """The entries hash and the expiry zset, in the order the scripts take them."""
        return [self._key("p", channel), self._key("z", channel)]

    def topic(self, channel: str) -> bytes:
        return self._key("t", channel).encode()

    def registry(self, key: str) -> str:
        return self._key("r", key)

    def once(self, channel: str, key: str) -> str:
        """A publish's idempotency key: in the channel's slot (its hash tag first)."""
        return f"{self._key('i', channel)}:{key}"
