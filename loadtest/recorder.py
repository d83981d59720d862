"""Per-connection delivery accounting inside a client worker: latency, loss, duplicates.

Every payload carries its channel's sequence number ``seq`` (1, 2, 3 … per channel), the
step ``s`` of the run it was published in, and its send time ``t``. A connection
subscribes before the first publication, so it expects every ``seq`` from 1:

* ``seq == last + 1``: in order.
* ``seq > last + 1``: the skipped numbers are remembered as missing (up to
  ``MISSING_CAP`` per connection); unless they arrive later they are lost.
* ``seq <= last``: a missing number arriving late is *reordered* (still delivered);
  anything else is a *duplicate*.

Only connections that are still open at the end count towards loss: a connection the
server closed (e.g. a slow consumer) is reported by its close code instead, unless the
worker keeps its clients (``resuming``: each comes back and resumes, so a close is an
event in its life, not its end). A gap the server *announced* (a subscribe answered
``recovered: false``, or a push in a new epoch) is not a loss: the numbers it skipped
are counted as ``announced`` (``Recorder.announce``). Slow
consumers' deliveries are counted but kept out of the latency figures, which describe
the clients that keep up.

A delivery's latency is measured when the client process reads it (``now``) and, where
the client reads with the kernel's receive times (``loadtest.clients.stamped``), also
when it arrived in the client's kernel (``arrived``): the first includes the time it
waited for one process to read thousands of sockets, the second is the server's alone.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from loadtest.histogram import Histogram

MISSING_CAP = 100_000


class ConnState:
    __slots__ = (
        "announced",
        "channel",
        "close_code",
        "closed",
        "counted",
        "dups",
        "last",
        "missing",
        "ready",
        "reordered",
        "slow",
        "unique",
    )

    def __init__(self, channel: str, slow: bool, n_steps: int) -> None:
        self.channel = channel
        self.slow = slow
        self.last = 0
        self.missing: set[int] | None = None
        self.unique = [0] * n_steps
        self.dups = 0
        self.reordered = 0
        self.ready = False
        self.counted = False  # in ``alive_by_channel``
        self.closed = False
        self.close_code: int | None = None
        self.announced = 0  # numbers skipped across gaps the server announced


class Recorder:
    """Everything one worker measured; ``state()`` is what it sends to the coordinator."""

    def __init__(self, n_steps: int, t0: float) -> None:
        self.t0 = t0
        self.n_steps = n_steps
        self.step_hists = [Histogram() for _ in range(n_steps)]
        self.arrival_hists = [Histogram() for _ in range(n_steps)]  # kernel receive times
        self.second_hists: dict[int, Histogram] = {}
        self.unique_by_step = [0] * n_steps
        self.announced_by_step = [0] * n_steps
        self.resuming = False  # a closed connection comes back (``loadtest.storm.Keeper``)
        self.conns: list[ConnState] = []
        self.alive_by_channel: Counter[str] = Counter()
        self.received = 0
        self.duplicates = 0
        self.reordered = 0
        self.slow_received = 0
        self.foreign = 0  # payloads outside the run's steps
        self.closes: Counter[str] = Counter()  # "normal:4008", "slow:4008", ...
        self.connect_hist = Histogram()
        self.connect_failures: Counter[str] = Counter()
        self.churn_hist = Histogram()
        self.churn_ok = 0
        self.churn_failures: Counter[str] = Counter()

    def add(self, channel: str, slow: bool) -> ConnState:
        conn = ConnState(channel, slow, self.n_steps)
        self.conns.append(conn)
        return conn

    def on_ready(self, conn: ConnState) -> None:
        conn.ready = True
        if not conn.slow and not conn.counted:
            conn.counted = True
            self.alive_by_channel[conn.channel] += 1

    def announce(self, conn: ConnState, seq: int, step: int) -> int:
        """The server announced a gap before the publication ``seq`` (of ``step``): the
        numbers between the last one received and ``seq`` are announced, not lost.
        Returns how many that is."""
        missed = max(0, seq - conn.last - 1)
        if missed:
            conn.last = seq - 1
            conn.announced += missed
            if 0 <= step < self.n_steps:
                self.announced_by_step[step] += missed
        return missed

    def on_payload(
        self, conn: ConnState, payload: dict[str, Any], now: float, arrived: float | None = None
    ) -> None:
        self.received += 1
        try:
            seq = payload["seq"]
            step = payload["s"]
            sent = payload["t"]
        except (KeyError, TypeError):
            self.foreign += 1
            return
        if not 0 <= step < self.n_steps:
            self.foreign += 1
            return
        last = conn.last
        if seq == last + 1:
            conn.last = seq
        elif seq > last:
            missing = conn.missing
            if missing is None:
                missing = conn.missing = set()
            if len(missing) < MISSING_CAP:
                missing.update(range(last + 1, seq))
            conn.last = seq
        else:
            missing = conn.missing
            if missing and seq in missing:
                missing.discard(seq)
                conn.reordered += 1
                self.reordered += 1
            else:
                conn.dups += 1
                self.duplicates += 1
                return
        if conn.slow:
            self.slow_received += 1
            return
        conn.unique[step] += 1
        self.unique_by_step[step] += 1
        us = int((now - sent) * 1_000_000)
        self.step_hists[step].record_us(us)
        if arrived is not None:
            self.arrival_hists[step].record_us(max(0, int((arrived - sent) * 1_000_000)))
        second = int(now - self.t0)
        hist = self.second_hists.get(second)
        if hist is None:
            hist = self.second_hists[second] = Histogram()
        hist.record_us(us)

    def on_closed(self, conn: ConnState, code: int | None, *, expected: bool) -> None:
        """The connection ended; ``expected`` when this worker closed it itself."""
        if conn.closed:
            return
        conn.closed = True
        conn.close_code = code
        if expected:
            return
        kind = "slow" if conn.slow else "normal"
        self.closes[f"{kind}:{code if code is not None else 'eof'}"] += 1
        if self.resuming:
            return
        if conn.counted:
            conn.counted = False
            self.alive_by_channel[conn.channel] -= 1
            for step, n in enumerate(conn.unique):
                self.unique_by_step[step] -= n

    def progress(self) -> dict[str, Any]:
        return {
            "received": self.received,
            "unique_by_step": list(self.unique_by_step),
            "announced_by_step": list(self.announced_by_step),
            "alive_by_channel": dict(self.alive_by_channel),
            "ready": sum(1 for c in self.conns if c.ready and not c.closed),
            "closed": sum(self.closes.values()),
            "failed": sum(self.connect_failures.values()),
            "churn_ok": self.churn_ok,
            "churn_failed": sum(self.churn_failures.values()),
        }

    def state(self) -> dict[str, Any]:
        """Final figures; unique deliveries only of normal connections still open."""
        unique: Counter[tuple[str, int]] = Counter()
        unannounced = 0  # numbers skipped without an announced gap, never received
        with_loss = 0
        for conn in self.conns:
            if conn.counted and (self.resuming or not conn.closed):
                for step, n in enumerate(conn.unique):
                    if n:
                        unique[(conn.channel, step)] += n
                if conn.missing:
                    unannounced += len(conn.missing)
                    with_loss += 1
        return {
            "received": self.received,
            "duplicates": self.duplicates,
            "reordered": self.reordered,
            "slow_received": self.slow_received,
            "foreign": self.foreign,
            "closes": dict(self.closes),
            "alive_by_channel": {k: v for k, v in self.alive_by_channel.items() if v},
            "unique": dict(unique),
            "announced_by_step": list(self.announced_by_step),
            "unannounced_missing": unannounced,
            "clients_with_unannounced_missing": with_loss,
            "step_hists": [h.to_state() for h in self.step_hists],
            "arrival_hists": [h.to_state() for h in self.arrival_hists],
            "second_hists": {s: h.to_state() for s, h in self.second_hists.items()},
            "connect_hist": self.connect_hist.to_state(),
            "connect_failures": dict(self.connect_failures),
            "slow_conns": sum(1 for c in self.conns if c.slow),
            "slow_ready": sum(1 for c in self.conns if c.slow and c.ready),
            "churn_hist": self.churn_hist.to_state(),
            "churn_ok": self.churn_ok,
            "churn_failures": dict(self.churn_failures),
        }
