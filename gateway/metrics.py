"""Prometheus metrics, one registry per app.

Counters that move on the hot path are plain integers in ``HubStats`` and in
``Connections``; the collector reads them at scrape time, so fan-out never
touches a prometheus-client object per delivery.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from channels.hub import Hub
from gateway import metrics_shared
from gateway.connections import TRANSPORTS, Connections

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class GatewayCollector(Collector):
    def __init__(self, hub: Hub, connections: Connections) -> None:
        self._hub = hub
        self._connections = connections

    def collect(self) -> Iterator[Metric]:
        hub, counts = self._hub, self._connections
        stats = hub.stats
        connections = GaugeMetricFamily(
            "gateway_connections", "Open client connections", labels=["transport"]
        )
        for transport in TRANSPORTS:
            connections.add_metric([transport], counts.open[transport])
        yield connections
        yield GaugeMetricFamily(
            "gateway_subscriptions",
            "Client subscriptions on this worker",
            hub.subscription_count,
        )
        yield GaugeMetricFamily(
            "gateway_channels", "Channels with a broker subscription", hub.channel_count
        )
        yield CounterMetricFamily(
            "gateway_publications", "Publications accepted by this worker", stats.publications_in
        )
        yield CounterMetricFamily(
            "gateway_broker_messages", "Messages received from the broker", stats.messages_received
        )
        yield CounterMetricFamily(
            "gateway_deliveries", "Messages queued to clients", stats.deliveries
        )
        yield CounterMetricFamily(
            "gateway_drops",
            "Messages not delivered: duplicate or stale ones from the broker, and those "
            "dropped with a slow consumer's queue when it was closed",
            stats.drops + counts.dropped,
        )
        refused = CounterMetricFamily(
            "gateway_connections_refused",
            "Connections refused before they opened: a WebSocket by its close "
            "(try_again_later at GATEWAY_MAX_CONNECTIONS, unauthorized, origin_not_allowed, "
            "service_restart, refused_by_hook, connect_hook_failed), an SSE request by its "
            "error (unavailable, unauthorized, forbidden, bad_request, ...)",
            labels=["transport", "reason"],
        )
        for (transport, reason), count in sorted(counts.refused.items()):
            refused.add_metric([transport, reason], count)
        yield refused
        slow = CounterMetricFamily(
            "gateway_slow_consumer_closes",
            "Connections closed because they did not read",
            labels=["transport"],
        )
        for transport in TRANSPORTS:
            slow.add_metric([transport], counts.slow_closes[transport])
        yield slow
        yield CounterMetricFamily(
            "gateway_broker_reconnects",
            "Broker reconnections",
            hub.reconnects,
        )
        yield CounterMetricFamily(
            "gateway_recoveries", "Channel recoveries from history", stats.recoveries
        )


class Metrics:
    def __init__(self, hub: Hub, connections: Connections) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(GatewayCollector(hub, connections))
        # process_open_fds (a descriptor per client), _resident_memory_bytes, _cpu_...:
        # read from /proc at scrape time only.
        ProcessCollector(registry=self.registry)
        self.latency = Histogram(
            "gateway_publish_to_send_seconds",
            "Time from publication to its first write to a client socket (sampled per batch)",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.hook_seconds = Histogram(
            "gateway_hook_seconds",
            "Duration of backend hook calls",
            labelnames=["hook"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.hook_outcomes = Counter(
            "gateway_hook_outcomes",
            "Backend hook calls by outcome (allow, accept, refuse, timeout, unreachable, "
            "bad_status, bad_reply)",
            labelnames=["hook", "outcome"],
            registry=self.registry,
        )

        # With --workers N: every worker's figures summed (gateway.metrics_shared).
        shared = metrics_shared.directory
        self.shared = (
            None if shared is None else metrics_shared.SharedMetrics(self.registry, shared)
        )

    def render(self) -> bytes:
        if self.shared is not None:
            return self.shared.render()
        return generate_latest(self.registry)
