"""The admin page's figures: this worker's, read from the objects ``/metrics`` reads
(``Connections``, ``Hub`` and its ``HubStats``), and every other worker's.

Cluster-wide (a shared broker): figures travel over the broker's signals, on demand.
Whenever the admin API is asked (at most once a second per worker), it signals a
request; every other worker answers with a signal carrying its snapshot, which each
worker keeps for ``FRESH`` seconds. So a view shows this worker as of now and the others
as of the previous request (the page polls every two seconds), and costs nothing while
nobody looks. A worker that does not answer (disconnected from the broker, gone) drops
out of the view after ``FRESH`` seconds. Each worker reports its ``TOP`` busiest channels:
the cluster's top list sums those, exact for channels in every worker's top list.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import time
from typing import Any

import orjson

from channels.broker import BrokerUnavailable
from channels.tasks import Tasks
from gateway.connections import TRANSPORTS
from gateway.runtime import Gateway

logger = logging.getLogger(__name__)

REQUEST, REPORT = "admin_stats_request", "admin_stats"
TOP = 20  # channels each worker reports
FRESH = 10.0  # seconds another worker's snapshot is shown
ASK_EVERY = 1.0  # seconds between two requests of one worker
COUNTERS = ("publications", "broker_messages", "deliveries", "drops", "recoveries")


def broker_kind(url: str) -> str:
    """The broker's scheme and server count, never its address (it may hold a password)."""
    scheme = url.partition("://")[0] or "memory"
    servers = url.count("://")
    return scheme if servers <= 1 else f"{scheme} x{servers}"


class ClusterStats:
    """This worker's snapshot, and the other workers' as they last reported them."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.worker = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(2)}"
        self.started = time.time()
        self.peers: dict[str, tuple[float, dict[str, Any]]] = {}
        self._asked = 0.0
        self._tasks = Tasks(logger)
        gateway.hub.signals.listen(self._on_signal)

    async def start(self) -> None:
        """Nothing to start: requests and answers ride on the hub's broker."""

    async def close(self) -> None:
        await self._tasks.cancel()

    async def local(self) -> dict[str, Any]:
        """This worker, now."""
        gateway = self.gateway
        hub, connections, stats = gateway.hub, gateway.connections, gateway.hub.stats
        ready = await hub.ready()
        return {
            "worker": self.worker,
            "time": time.time(),
            "uptime": round(time.time() - self.started, 1),
            "draining": gateway.draining,
            "broker": {
                "kind": broker_kind(gateway.settings.broker_url),
                "ready": ready,
                "reconnects": hub.reconnects,
            },
            "connections": {t: connections.open[t] for t in TRANSPORTS},
            "max_connections": connections.limit,
            "subscriptions": hub.subscription_count,
            "channels": hub.channel_count,
            "counters": {
                "publications": stats.publications_in,
                "broker_messages": stats.messages_received,
                "deliveries": stats.deliveries,
                "drops": stats.drops + connections.dropped,
                "recoveries": stats.recoveries,
            },
            "slow_consumer_closes": {t: connections.slow_closes[t] for t in TRANSPORTS},
            "top_channels": [
                {"channel": name, "subscribers": n} for name, n in hub.busiest_channels(TOP)
            ],
        }

    async def cluster(self) -> dict[str, Any]:
        """Every worker heard from in the last ``FRESH`` seconds, this one first, and their
        sums; asks the others for fresh figures (answered for the next call)."""
        here = await self.local()
        await self._ask()
        self._forget_stale()
        workers = [here, *(snapshot for _, snapshot in self.peers.values())]
        return {"worker": self.worker, "workers": workers, "totals": totals(workers)}

    async def _ask(self) -> None:
        now = time.monotonic()
        if now - self._asked < ASK_EVERY:
            return
        self._asked = now
        with contextlib.suppress(BrokerUnavailable):
            await self.gateway.hub.signals.signal(
                orjson.dumps({"op": REQUEST, "worker": self.worker})
            )

    def _forget_stale(self) -> None:
        horizon = time.monotonic() - FRESH
        for worker in [w for w, (seen, _) in self.peers.items() if seen < horizon]:
            del self.peers[worker]

    async def _answer(self) -> None:
        report = {"op": REPORT, "worker": self.worker, "stats": await self.local()}
        with contextlib.suppress(BrokerUnavailable):
            await self.gateway.hub.signals.signal(orjson.dumps(report))

    def _on_signal(self, data: bytes) -> None:
        try:
            signal = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        if not isinstance(signal, dict) or signal.get("worker") == self.worker:
            return
        op = signal.get("op")
        if op == REQUEST:
            self._tasks.spawn(self._answer(), "admin-stats-answer")
        elif op == REPORT and isinstance(signal.get("stats"), dict):
            self.peers[str(signal["worker"])] = (time.monotonic(), signal["stats"])
            self._forget_stale()


def totals(workers: list[dict[str, Any]]) -> dict[str, Any]:
    """The workers' figures summed; the top channels merged by name."""
    channels: dict[str, int] = {}
    for worker in workers:
        for entry in worker.get("top_channels", []):
            channels[entry["channel"]] = channels.get(entry["channel"], 0) + entry["subscribers"]
    top = sorted(channels.items(), key=lambda item: (-item[1], item[0]))[:TOP]
    return {
        "workers": len(workers),
        "connections": {t: sum(w["connections"].get(t, 0) for w in workers) for t in TRANSPORTS},
        "subscriptions": sum(w["subscriptions"] for w in workers),
        "counters": {c: sum(w["counters"].get(c, 0) for w in workers) for c in COUNTERS},
        "slow_consumer_closes": {
            t: sum(w["slow_consumer_closes"].get(t, 0) for w in workers) for t in TRANSPORTS
        },
        "broker_reconnects": sum(w["broker"]["reconnects"] for w in workers),
        "top_channels": [{"channel": c, "subscribers": n} for c, n in top],
    }
