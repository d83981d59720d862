"""Clients that stay: cut, closed or refused, each comes back and resumes as ``client.js``.

``ResumingWs`` is the gateway's WebSocket dialect for one such client. It remembers the
position (epoch, offset) of the last publication it received and resubscribes with
``since``; like ``client.js`` it keeps that position when the reply says
``recovered: true`` (the missed publications follow), takes the reply's position when
it says ``recovered: false``, and treats a push in a new epoch as a lost history. Those
two are *announced gaps*: the publications skipped across one are counted as announced
(``Recorder.announce``), not lost, and each gap is judged once the next publication
shows what was skipped:

* ``real``: publications were skipped and history could not have had them all (the
  epoch changed, or more than ``history_size`` were published since the client's
  position);
* ``empty``: nothing was skipped (e.g. a new epoch when nothing was lost in between);
* ``needless``: publications were skipped that history still held - a gateway shortfall.

Across a new epoch a client also skips what the new epoch held before its subscribe
(``recovered: false`` continues after the reply's top, PROTOCOL.md: the client refetches
its state); those are counted as ``in_new_epoch``, part of the announced ones.

A ``Keeper`` holds one client for the whole run: whenever its connection ends (our own
TCP reset, a close frame, the server vanishing) it waits as ``client.js`` would
(``delay_after``), reconnects to a random gateway of ``ports`` - a refused connection is
passed to another at once, as a load balancer does (nginx ``proxy_next_upstream``) - and
retries with ``client.js``'s backoff until ``GIVE_UP``; a subscribe answered ``internal``
(the broker away) is sent again on the same connection 1-2 s later, as ``client.js``
does. With ``jitter_every`` it also
resets its own connection at random about that often and stays offline about
``offline`` seconds first. The ``ConnState`` carries on across every reconnect, so the
recorder's checks (every ``seq`` once, in order) span the client's whole life.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import struct
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from loadtest.clients import WsClient, connect_ws
from loadtest.dialects import READY, Event, Failed, GatewayWs, Later, loads
from loadtest.histogram import Histogram
from loadtest.recorder import ConnState, Recorder

GIVE_UP = 60.0
# client.js: the first delay after a lost connection, and the backoff's bounds (s).
MIN_RECONNECT_DELAY = 0.5
MAX_RECONNECT_DELAY = 20.0


class Reach(Protocol):
    """Where the clients connect (a ``WorkerPlan``)."""

    host: str
    port: int
    ports: list[int]
    token: str
    connect_timeout: float


def jitter(seconds: float) -> float:
    """``client.js``'s jitter: 50-100 % of ``seconds``."""
    return seconds / 2 + random.random() * seconds / 2


def backoff(failures: int) -> float:
    """``client.js``'s delay before the next attempt after ``failures`` failed ones."""
    return jitter(min(MAX_RECONNECT_DELAY, MIN_RECONNECT_DELAY * 2 ** min(failures, 30)))


def delay_after(cause: str, offline: float) -> float:
    """How long ``client.js`` waits before reconnecting after a connection ended so."""
    if cause == "cut":
        return offline  # our own reset: the client stays away as long as it was told
    if cause in ("close:1012", "close:4008"):
        return jitter(1.0)  # a restart: come back soon, elsewhere, and recover
    if cause == "close:4001":
        return jitter(0.5)
    return backoff(0)


def failure_reason(exc: BaseException) -> str:
    """A short, stable label for a failed connect (counted, not logged one by one)."""
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return "timeout"
    text = str(exc).splitlines()[0] if str(exc) else ""
    if isinstance(exc, OSError) and exc.errno is not None:
        text = os.strerror(exc.errno)
    return f"{type(exc).__name__}: {text}"[:160]


@dataclass
class ResumeFigures:
    """What the resuming clients of one worker process saw (merged by the coordinator)."""

    recovered: Counter[str] = field(default_factory=Counter)
    announced: Counter[str] = field(default_factory=Counter)  # by reason: epoch, history
    gaps: Counter[str] = field(default_factory=Counter)  # real, empty, needless
    gap_missed: Counter[str] = field(default_factory=Counter)  # publications skipped, by kind
    replay: Histogram = field(default_factory=Histogram)
    back: Histogram = field(default_factory=Histogram)  # first attempt -> subscribed
    outage: Histogram = field(default_factory=Histogram)  # connection lost -> subscribed
    causes: Counter[str] = field(default_factory=Counter)  # why connections ended
    failures: Counter[str] = field(default_factory=Counter)  # failed attempts, by reason
    refusals: Counter[str] = field(default_factory=Counter)  # subscribe errors, by code
    gave_up: int = 0

    def to_state(self) -> dict[str, Any]:
        return {
            "recovered": dict(self.recovered),
            "announced": dict(self.announced),
            "gaps": dict(self.gaps),
            "gap_missed": dict(self.gap_missed),
            "replay": self.replay.to_state(),
            "back": self.back.to_state(),
            "outage": self.outage.to_state(),
            "causes": dict(self.causes),
            "failures": dict(self.failures),
            "refusals": dict(self.refusals),
            "gave_up": self.gave_up,
        }

    def merge_state(self, state: dict[str, Any]) -> None:
        keys = ("recovered", "announced", "gaps", "gap_missed", "causes", "failures", "refusals")
        for key in keys:
            getattr(self, key).update(state[key])
        for key in ("replay", "back", "outage"):
            getattr(self, key).merge(Histogram.from_state(state[key]))
        self.gave_up += state["gave_up"]


class ResumingWs(GatewayWs):
    """The gateway's dialect for one connection that resumes as ``client.js`` does."""

    def __init__(self, history_size: int = 100, figures: ResumeFigures | None = None) -> None:
        self.history_size = history_size
        self.figures = figures if figures is not None else ResumeFigures()
        self.position: dict[str, Any] | None = None
        self.since: dict[str, Any] | None = None  # of the last subscribe sent
        self.recovered: bool | None = None
        self.conn: ConnState | None = None
        self.recorder: Recorder | None = None
        # An announced gap not judged yet: (reason, publications since our position
        # when the server said so - None across epochs -, the new epoch's publications
        # before the client's new position).
        self.gap: tuple[str, int | None, int] | None = None
        self.replaying: tuple[float, str, int] | None = None  # (reply time, epoch, offset)

    def per_connection(self) -> ResumingWs:
        return ResumingWs(self.history_size, self.figures)

    def bind(self, conn: ConnState, recorder: Recorder) -> None:
        self.conn, self.recorder = conn, recorder

    def hello(self, channel: str) -> list[bytes]:
        command: dict[str, Any] = {"id": 1, "op": "subscribe", "channel": channel}
        self.since = self.position
        if self.position is not None:
            command["since"] = self.position
        return [orjson.dumps(command)]

    def announce(self, reason: str, distance: int | None, new_top: int = 0) -> None:
        self.figures.announced[reason] += 1
        if self.gap is not None and self.gap[0] == "epoch":  # two at once: judged as one
            reason, distance, new_top = "epoch", None, max(new_top, self.gap[2])
        self.gap = (reason, distance, new_top)

    def judge(self, seq: int, step: int) -> None:
        """The first publication after an announced gap: what was skipped, and whether
        history could have had it."""
        assert self.gap is not None and self.conn is not None and self.recorder is not None
        reason, distance, new_top = self.gap
        self.gap = None
        missed = self.recorder.announce(self.conn, seq, step)
        if not missed:
            kind = "empty"
        elif reason == "epoch" or (distance is not None and distance > self.history_size):
            kind = "real"
        else:
            kind = "needless"
        self.figures.gaps[kind] += 1
        self.figures.gap_missed[kind] += missed
        if reason == "epoch" and missed:
            self.figures.gap_missed["in_new_epoch"] += min(missed, new_top)

    def parse(self, data: bytes, channel: str) -> Event:
        message = loads(data)
        payload = message.get("data")
        if type(payload) is dict:
            epoch, offset = message["epoch"], message["offset"]
            position = self.position
            if position is not None and position["epoch"] != epoch:
                self.announce("epoch", None, offset - 1)  # history lost: a new stream
                position = None
            if position is None or offset > position["offset"]:
                self.position = {"offset": offset, "epoch": epoch}
            if self.gap is not None and "seq" in payload:
                self.judge(payload["seq"], payload.get("s", 0))
            replaying = self.replaying
            if replaying is not None and (epoch != replaying[1] or offset >= replaying[2]):
                self.replaying = None
                self.figures.replay.record_us(int((time.perf_counter() - replaying[0]) * 1e6))
            return payload
        if "id" in message:
            if not message.get("ok"):
                error = message.get("error")
                code = error.get("code") if isinstance(error, dict) else str(error)
                self.figures.refusals[str(code)] += 1
                if code == "internal":  # client.js: the same subscribe again in 1-2 s
                    return Later(self.hello(channel)[0], jitter(2.0))
                return Failed(str(code))
            result = message["result"]
            top = {"offset": result["offset"], "epoch": result["epoch"]}
            position = self.position
            if position is None:  # a first subscribe: from the top it answered
                self.position = top
                return READY
            self.recovered = bool(result.get("recovered"))
            self.figures.recovered[str(self.recovered).lower()] += 1
            if self.recovered:
                since = self.since or position
                if top["epoch"] == since["epoch"] and top["offset"] > since["offset"]:
                    if top["epoch"] == position["epoch"] and top["offset"] <= position["offset"]:
                        self.figures.replay.record_us(0)  # it all came before the reply
                    else:
                        self.replaying = (time.perf_counter(), top["epoch"], top["offset"])
            else:
                same = top["epoch"] == position["epoch"]
                distance = top["offset"] - position["offset"] if same else None
                self.announce("history" if same else "epoch", distance, top["offset"])
                self.position = top
            return READY
        return None


def reset(client: WsClient) -> None:
    """Cut ``client``'s connection with a TCP reset, not a close handshake."""
    client.closing = True  # the recorder counts it as ours, not as a server close
    if client.transport is None:
        return
    transport = client.transport.underlying_transport
    with contextlib.suppress(OSError, AttributeError):
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


@dataclass
class Keeping:
    """What every keeper of a worker shares: where to go, how to behave, the figures."""

    reach: Reach
    recorder: Recorder
    figures: ResumeFigures
    jitter_every: float = 0.0  # 0: no random cuts
    offline: float = 2.0
    calm: bool = False  # no more random cuts (the run is ending)


class Keeper:
    """One client kept subscribed through every disconnection (see the module doc)."""

    def __init__(self, keeping: Keeping, client: WsClient) -> None:
        self.keeping = keeping
        self.client = client
        self.cause: str | None = None  # set when we cut the connection ourselves
        self.offline = 0.0
        self.reconnects = 0
        self.task: asyncio.Task[None] | None = None

    @property
    def connected(self) -> bool:
        return self.client.conn.ready and not self.client.conn.closed

    def cut(self, offline: float) -> None:
        """Reset the connection now; come back after ``offline`` s."""
        if self.cause is None and self.connected:
            self.cause, self.offline = "cut", offline
            reset(self.client)

    def next_cut(self) -> float | None:
        every = self.keeping.jitter_every
        if not every or self.keeping.calm:
            return None
        return random.uniform(0.5, 1.5) * every

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        keeping = self.keeping
        first = True
        while True:
            client = self.client
            wait = self.next_cut()
            if first and wait is not None:
                wait = random.uniform(0.0, keeping.jitter_every)  # spread the first cuts
            first = False
            try:
                await asyncio.wait_for(asyncio.shield(client.disconnected), wait)
            except TimeoutError:
                if keeping.calm:
                    continue
                self.cut(random.uniform(0.5, 1.5) * keeping.offline)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(client.disconnected), 5)
            lost = loop.time()
            if self.cause is not None:
                cause = self.cause
            elif client.close_code is not None:
                cause = f"close:{client.close_code}"
            else:
                cause = "eof"
            keeping.figures.causes[cause] += 1
            offline, self.offline, self.cause = self.offline, 0.0, None
            client.conn.ready = False
            delay = delay_after(cause, offline)
            if delay > 0:
                await asyncio.sleep(delay)
            back = await self.reconnect()
            if back is None:
                return
            now = loop.time()
            keeping.figures.back.record_us(int((now - lost - delay) * 1e6))
            keeping.figures.outage.record_us(int((now - lost) * 1e6))
            self.client = back
            self.reconnects += 1

    async def reconnect(self) -> WsClient | None:
        """Attempts until one subscribes (None after ``GIVE_UP`` s)."""
        loop = asyncio.get_running_loop()
        keeping, reach = self.keeping, self.keeping.reach
        conn, dialect = self.client.conn, self.client.dialect
        ports = reach.ports or [reach.port]
        began = loop.time()
        refused: set[int] = set()
        failures = 0
        while True:
            if loop.time() - began > GIVE_UP:
                keeping.figures.gave_up += 1
                return None
            port = random.choice([p for p in ports if p not in refused] or ports)
            conn.closed, conn.close_code = False, None
            try:
                return await connect_ws(
                    dialect, reach.host, port, reach.token, conn, keeping.recorder,
                    timeout=reach.connect_timeout,
                )  # fmt: skip
            except ConnectionRefusedError:
                keeping.figures.failures["refused"] += 1
                refused.add(port)
                if len(refused) < len(ports):
                    continue  # passed on to another gateway at once
                refused.clear()
            except Exception as exc:
                keeping.figures.failures[failure_reason(exc)] += 1
            conn.closed = False
            await asyncio.sleep(backoff(failures + 1))
            failures += 1


def cut_all(keepers: list[Keeper]) -> int:
    """The reconnect storm: every connected client reset at once, straight back."""
    cut = 0
    for keeper in keepers:
        if keeper.connected:
            keeper.cut(0.0)
            cut += 1
    return cut
