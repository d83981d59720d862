"""What a run is pointed at and how the load is generated (shared by every scenario)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

# The CPUs this process may use before a run pins it to the load-generator CPUs: every
# run (compare makes several in one process) places its server and clients within these.
USABLE_CPUS: frozenset[int] = frozenset(os.sched_getaffinity(0))


@dataclass
class Setup:
    target: str = "gateway"
    transport: Literal["ws", "sse"] = "ws"
    # An already running server (e.g. your deployment); None: the tool starts one.
    url: str | None = None
    server_pid: int | None = None
    token: str | None = None
    jwt_secret: str | None = None
    # A gateway the tool starts: its broker; how publications get in.
    broker: Literal["memory", "redis"] = "memory"
    publish_via: Literal["api", "redis"] = "api"
    redis_url: str | None = None
    redis_prefix: str = "gw"
    history_size: int = 100
    server_env: dict[str, str] = field(default_factory=dict)
    # More than one: that many single-worker gateways on ports of their own behind Redis
    # (``servers.GatewayFleet``); the clients pick one at random.
    gateways: int = 1
    # CPU placement: the server (when the tool starts it) and everything else.
    server_cpus: list[int] | None = None
    loadgen_cpus: list[int] | None = None
    workers: int | None = None
    # Connections.
    connect_rate: float = 1000.0
    connect_concurrency: int = 200
    connect_timeout: float = 15.0
    per_source_limit: int = 25_000
    slow_share: float = 0.0
    slow_interval: float = 1.0
    slow_rcvbuf: int = 8192
    # Read with the kernel's receive times (``loadtest.clients.stamped``): each step's
    # latency also at arrival in the client's kernel, not only when its process read it.
    kernel_stamps: bool = False
    # Publications.
    pad_bytes: int = 64
    publish_lanes: int = 1
    drain_timeout: float = 10.0
    p99_limit_ms: float = 250.0
    # Output.
    out: Path | None = None
    plot: Path | None = None
    no_plot: bool = False
    quiet: bool = False
    command: str = ""

    def resolved_cpus(self, spawning: bool) -> tuple[list[int] | None, list[int]]:
        """(server CPUs, load-generator CPUs). By default a server the tool starts gets the
        first usable CPU and everything else (clients, publisher, redis) the others."""
        usable = sorted(USABLE_CPUS)
        server = self.server_cpus
        if server is None and spawning and len(usable) >= 2:
            server = [usable[0]]
        loadgen = self.loadgen_cpus
        if loadgen is None:
            loadgen = [c for c in usable if not server or c not in server] or usable
        return server, loadgen
