"""One run's moving parts: servers, client workers, samplers, progress, in start/stop order.

``async with Harness(setup, "fanout") as h`` starts redis-server if the run needs one and
the server under test (unless ``setup.url`` points at a running one), pins itself to the
load-generator CPUs and samples the server's and its own processes' CPU and memory every
``SAMPLE_INTERVAL``. Leaving the block stops the workers, the server and redis-server,
in that order, whatever happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import secrets
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from loadtest import callgrind
from loadtest.config import USABLE_CPUS, Setup
from loadtest.pool import WorkerPool
from loadtest.ports import free_port
from loadtest.procstat import MachineSampler, ProcessSampler, find_pid_by_port
from loadtest.progress import Progress
from loadtest.publisher import (
    ApiPublisher,
    GatewayBrokerPublisher,
    NchanPublisher,
    Publisher,
    RedisPublisher,
    SocketIoPublisher,
)
from loadtest.servers import (
    GatewayFleet,
    RedisServer,
    TargetServer,
    baseline_server,
    gateway_server,
    new_secret,
)
from loadtest.targets import TARGETS, Target
from loadtest.worker import ConnSpec, WorkerPlan, raise_fd_limit

SAMPLE_INTERVAL = 0.5
FD_MARGIN = 200


class Harness:
    def __init__(self, setup: Setup, scenario: str) -> None:
        self.setup = setup
        self.scenario = scenario
        self.target: Target = TARGETS[setup.target]
        self.dialect = self.target.dialect(setup.transport)
        self.run_id = secrets.token_hex(3)
        self.t0 = time.time()
        self.progress = Progress(enabled=not setup.quiet)
        self.status: Callable[[], tuple[str, float | None, str]] | None = None
        self.notes: list[str] = []
        self.redis: RedisServer | None = None
        self.server: TargetServer | None = None
        # Nchan: the second nginx that takes the publications (on the load-generator CPUs).
        self.publish_server: TargetServer | None = None
        self.fleet: GatewayFleet | None = None
        # Every gateway process of a fleet, by name ("gateway-0", "gateway-0#1" once it
        # was started again, ...): sampled like the server.
        self.fleet_samplers: dict[str, ProcessSampler] = {}
        self.pool: WorkerPool | None = None
        self.server_sampler: ProcessSampler | None = None
        self.loadgen_samplers: dict[str, ProcessSampler] = {}
        self.machine = MachineSampler()
        self.tasks: list[asyncio.Task[None]] = []
        self.host = "127.0.0.1"
        self.port = 0
        self.token = ""
        self.secret = ""
        self.redis_url: str | None = setup.redis_url
        self.fd_limit = raise_fd_limit()
        spawning = setup.url is None
        self.server_cpus, self.loadgen_cpus = setup.resolved_cpus(spawning)

    # -- names -----------------------------------------------------------------------

    def channel(self, i: int = 0) -> str:
        """Channel names unique to this run, so reruns never share history or offsets."""
        return f"lt-{self.run_id}-{i}"

    @property
    def needs_redis(self) -> bool:
        if self.target.publish == "nchan":
            return self.setup.url is None  # both nginx the tool starts share one Redis
        if self.target.publish != "gateway" or self.setup.publish_via == "redis":
            return True
        return self.setup.url is None and self.setup.broker == "redis"

    # -- lifecycle -------------------------------------------------------------------

    async def __aenter__(self) -> Harness:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, self.loadgen_cpus)
        try:
            await self._start_servers()
        except BaseException:
            await self._stop_servers()
            raise
        self.loadgen_samplers["coordinator"] = ProcessSampler(os.getpid())
        self.tasks.append(asyncio.create_task(self._sample_forever()))
        self.tasks.append(asyncio.create_task(self._show_progress()))
        return self

    async def __aexit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, USABLE_CPUS)
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.progress.close()
        if self.pool is not None:
            with contextlib.suppress(Exception):
                await self.pool.close()
        await self._stop_servers()

    async def _start_servers(self) -> None:
        setup = self.setup
        if self.needs_redis and self.redis_url is None:
            self.redis = RedisServer(cpus=self.loadgen_cpus).start()
            await self.redis.wait_ready()
            self.redis_url = self.redis.url
            self.loadgen_samplers["redis-server"] = ProcessSampler(self.redis.pid)
        secret = setup.jwt_secret or new_secret()
        if setup.url is None:
            self.port = free_port()
            if self.target.publish == "nchan":
                from loadtest.nchan import nchan_servers

                assert self.redis_url is not None
                self.server, self.publish_server = nchan_servers(
                    self.port,
                    redis_url=self.redis_url,
                    server_cpus=self.server_cpus,
                    loadgen_cpus=self.loadgen_cpus,
                )
                self.publish_server.start()
                await self.publish_server.wait_ready()
                self.loadgen_samplers["nginx-publisher"] = ProcessSampler(self.publish_server.pid)
            elif self.target.module is None:
                broker_url = "memory://"
                if setup.broker == "redis":
                    assert self.redis_url is not None
                    broker_url = self.redis_url
                env = {"GATEWAY_BROKER_PREFIX": setup.redis_prefix, **setup.server_env}
                env["GATEWAY_HISTORY_SIZE"] = str(setup.history_size)
                if setup.gateways > 1:
                    await self._start_fleet(broker_url, secret, env)
                    self.secret = secret
                    self.token = setup.token or self._make_token(secret)
                    return
                self.server = gateway_server(
                    self.port,
                    broker_url=broker_url,
                    secret=secret,
                    cpus=self.server_cpus,
                    extra_env=env,
                )
            else:
                assert self.redis_url is not None
                self.server = baseline_server(
                    self.target.name,
                    self.target.module,
                    self.port,
                    redis_url=self.redis_url,
                    cpus=self.server_cpus,
                    callgrind_out=setup.server_env.get(callgrind.ENV),
                )
            self.server.start()
            self.progress.note(f"started {self.target.name}: {self.server.command}")
            await self.server.wait_ready()
            pid: int | None = self.server.pid
        else:
            parts = urlsplit(setup.url)
            self.host = parts.hostname or "127.0.0.1"
            self.port = parts.port or (443 if parts.scheme in ("https", "wss") else 80)
            pid = setup.server_pid
            if pid is None and self.host in ("127.0.0.1", "localhost", "::1"):
                pid = find_pid_by_port(self.port)
            if pid is None:
                self.notes.append("server pid unknown: no server CPU or memory figures")
        self.secret = secret
        if self.target.publish == "gateway":
            self.token = setup.token or self._make_token(secret)
        if pid is not None:
            self.server_sampler = ProcessSampler(pid)

    async def _start_fleet(self, broker_url: str, secret: str, env: dict[str, str]) -> None:
        if broker_url == "memory://":
            raise SystemExit("--gateways N shares one channel space: it needs --broker redis")
        self.fleet = fleet = GatewayFleet(
            self.setup.gateways,
            broker_url=broker_url,
            secret=secret,
            cpus=self.server_cpus,
            extra_env=env,
        )
        self.port = fleet.ports[0]
        self.progress.note(
            f"starting {len(fleet.ports)} gateways on ports {', '.join(map(str, fleet.ports))}: "
            f"{fleet.servers[0].command}"
        )
        await fleet.start_all()
        for i in range(len(fleet.ports)):
            self.watch_gateway(i)

    def watch_gateway(self, i: int) -> None:
        """Sample fleet gateway ``i`` (again, once it was started again)."""
        assert self.fleet is not None
        generation = self.fleet.generation[i]
        name = f"gateway-{i}" + (f"#{generation}" if generation else "")
        self.fleet_samplers[name] = ProcessSampler(self.fleet.servers[i].pid)

    @staticmethod
    def _make_token(secret: str, user: str = "loadtest") -> str:
        from auth.tokens import make_token

        return make_token(secret, user, subscribe=["*"], publish=["*"], ttl=7 * 86400)

    def client_token(self, n: int) -> str:
        """A token of its own for client ``n`` (for a gateway that remembers tokens)."""
        return self._make_token(self.secret, f"loadtest-{n}")

    async def _stop_servers(self) -> None:
        if self.fleet is not None:
            self.fleet.stop_all()
        if self.server is not None:
            self.server.stop()
        if self.publish_server is not None:
            self.publish_server.stop()
        if self.redis is not None:
            self.redis.stop()

    @property
    def base_url(self) -> str:
        return self.setup.url or f"http://{self.host}:{self.port}"

    # -- sampling and progress -------------------------------------------------------

    def sample(self) -> None:
        if self.server_sampler is not None:
            self.server_sampler.sample()
        for sampler in self.fleet_samplers.values():
            sampler.sample()
        for sampler in self.loadgen_samplers.values():
            sampler.sample()
        self.machine.sample()

    async def _sample_forever(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(SAMPLE_INTERVAL)

    async def _show_progress(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            if self.status is None:
                continue
            phase, fraction, detail = self.status()
            server = ""
            if self.server_sampler is not None:
                cpu = self.server_sampler.recent_utilisation()
                latest = self.server_sampler.latest()
                if cpu is not None and latest is not None:
                    server = f" | server {cpu:.0f}% cpu {latest.rss_kib / 1024:.0f} MiB"
            self.progress.update(phase, fraction, detail + server)

    def server_alive(self) -> bool:
        if self.fleet is not None:
            return any(self.fleet.running())
        return self.server is None or self.server.running()

    # -- clients ---------------------------------------------------------------------

    def specs(self, channels: list[str], slow_share: float | None = None) -> list[ConnSpec]:
        """One connection per entry of ``channels``; every k-th is a slow consumer, and
        past ``per_source_limit`` connections they use 127.0.0.2, .3, ... as source."""
        share = self.setup.slow_share if slow_share is None else slow_share
        n = len(channels)
        slow_every = round(1 / share) if share > 0 else 0
        spread = n > self.setup.per_source_limit and self.host.startswith("127.")
        specs = []
        for i, channel in enumerate(channels):
            slow = bool(slow_every) and i % slow_every == slow_every - 1
            local_ip = f"127.0.0.{2 + i // self.setup.per_source_limit}" if spread else None
            specs.append(ConnSpec(channel, slow=slow, local_ip=local_ip))
        if spread:
            self.notes.append(
                f"connections spread over {math.ceil(n / self.setup.per_source_limit)} "
                "loopback source addresses"
            )
        return specs

    def worker_count(self, n: int) -> int:
        if self.setup.workers:
            return self.setup.workers
        per_process = max(1000, self.fd_limit - FD_MARGIN)
        return max(1, len(self.loadgen_cpus), math.ceil(n / per_process)) if n else 1

    async def connect(self, specs: list[ConnSpec], n_steps: int) -> dict[str, Any]:
        """Start the workers and wait until every connection is subscribed (or failed)."""
        setup = self.setup
        if self.server is not None and len(specs) + FD_MARGIN > self.fd_limit:
            self.notes.append(
                f"the server's file-descriptor limit ({self.fd_limit}) is below the "
                f"{len(specs)} connections asked for: expect refused connections"
            )
        workers = self.worker_count(len(specs))
        chunks = [specs[i::workers] for i in range(workers)]
        ips: list[str | None] = [*sorted({s.local_ip for s in specs if s.local_ip})] or [None]
        plans = [
            WorkerPlan(
                index=i,
                host=self.host,
                port=self.port,
                dialect=self.dialect,
                token=self.token,
                conns=chunk,
                n_steps=n_steps,
                t0=self.t0,
                connect_rate=max(1.0, setup.connect_rate / workers),
                connect_concurrency=max(1, setup.connect_concurrency // workers),
                connect_timeout=setup.connect_timeout,
                slow_interval=setup.slow_interval,
                slow_rcvbuf=setup.slow_rcvbuf,
                kernel_stamps=setup.kernel_stamps,
                cpus=self.loadgen_cpus,
                churn_local_ips=list(ips),
                ports=list(self.fleet.ports) if self.fleet is not None else [],
            )
            for i, chunk in enumerate(chunks)
        ]
        self.pool = pool = WorkerPool(plans)
        pool.start()
        for i, pid in enumerate(pool.pids):
            self.loadgen_samplers[f"worker-{i}"] = ProcessSampler(pid)
        total = len(specs)
        began = time.time()

        def status() -> tuple[str, float | None, str]:
            t = pool.totals()
            done = t["ready"] + t["failed"]
            return (
                f"connecting {self.target.name}/{self.setup.transport}",
                done / total if total else 1.0,
                f"{t['ready']:,}/{total:,} subscribed, {t['failed']:,} failed",
            )

        self.status = status
        connected = await pool.wait_connected()
        self.status = None
        elapsed = time.time() - began
        totals = pool.totals()
        self.progress.note(
            f"{totals['ready']:,}/{total:,} connections subscribed in {elapsed:.1f} s"
            + (f", {totals['failed']:,} failed" if totals["failed"] else "")
        )
        # From the first worker's first connect to the last one's last subscribe: the
        # workers' start-up (a second or so) is in ``elapsed_s``, not in this.
        windows = [c["connect_window"] for c in connected if c.get("connect_window")]
        connecting = max(w[1] for w in windows) - min(w[0] for w in windows) if windows else None
        return {"elapsed_s": round(elapsed, 2), "connecting_s": connecting, **totals}

    def publisher(self) -> Publisher:
        kind = self.target.publish
        if kind == "gateway":
            if self.setup.publish_via == "api":
                return ApiPublisher(self.base_url, self.token)
            assert self.redis_url is not None
            return GatewayBrokerPublisher(
                self.redis_url, self.setup.redis_prefix, self.setup.history_size
            )
        if kind == "nchan":
            if self.publish_server is not None:
                return NchanPublisher(f"http://127.0.0.1:{self.publish_server.port}")
            return NchanPublisher(self.base_url)  # --url: a deployment with /pub/ beside /sub/
        assert self.redis_url is not None
        if kind == "socketio":
            return SocketIoPublisher(self.redis_url)
        return RedisPublisher(self.redis_url)

    @property
    def publish_via(self) -> str:
        if self.target.publish == "gateway":
            return self.setup.publish_via
        if self.target.publish == "nchan":
            return "nchan-http"
        return "redis"

    async def gateway_metrics(self, names: tuple[str, ...] | None = None) -> dict[str, float]:
        """The gateway's own counters from ``GET /metrics`` (empty for other targets):
        ``GATEWAY_COUNTERS``, or the samples ``names``."""
        if self.target.publish != "gateway":
            return {}
        import httpx

        try:
            async with httpx.AsyncClient(timeout=5.0) as client:
                response = await client.get(f"{self.base_url}/metrics")
        except httpx.HTTPError:
            return {}
        if response.status_code != 200:
            return {}
        return parse_metrics(response.text, GATEWAY_COUNTERS if names is None else names)

    async def drain(self, step: int, published: dict[str, int], timeout: float) -> bool:
        """Wait until every open subscriber got every publication of ``step``."""
        assert self.pool is not None
        deadline = time.monotonic() + timeout
        while True:
            totals = self.pool.totals()
            alive = totals["alive_by_channel"]
            expected = sum(n * alive.get(ch, 0) for ch, n in published.items())
            announced = totals["announced_by_step"]
            expected -= announced[step] if step < len(announced) else 0
            got = totals["unique_by_step"][step] if step < len(totals["unique_by_step"]) else 0
            if got >= expected:
                return True
            if time.monotonic() > deadline or not self.server_alive():
                return False
            await asyncio.sleep(0.1)


GATEWAY_COUNTERS = (
    "gateway_publications_total",
    "gateway_deliveries_total",
    "gateway_drops_total",
    "gateway_slow_consumer_closes_total",
    "gateway_connections",
    "gateway_broker_reconnects_total",
)


def parse_metrics(text: str, names: tuple[str, ...] = GATEWAY_COUNTERS) -> dict[str, float]:
    """The Prometheus samples ``names``, labels kept in the key (``name{label="v"}``)."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        if name.split("{", 1)[0] in names:
            try:
                values[name] = float(value)
            except ValueError:
                continue
    return values
