"""A client worker process: holds its share of the connections and measures them.

The coordinator (``loadtest.pool``) starts one worker per client core (more when the
connection count needs more file descriptors), each with a ``WorkerPlan``. A worker
connects its connections at its share of the connect rate, then reports progress over
its pipe every ``progress_interval`` and answers commands:

* ``("step", k)``: the latency histogram and unique deliveries of step ``k`` so far;
* ``("churn", rate, duration, hold)``: open, subscribe and close connections at ``rate``/s;
* ``("keep", jitter_every, offline)``: from now on every WebSocket client comes back
  whenever its connection ends, resuming (``loadtest.storm.Keeper``), and with
  ``jitter_every`` cuts its own connection at random that often;
* ``("cut", at)``: at wall time ``at`` reset every kept connection at once (a reconnect
  storm); ``("calm",)``: no more random cuts;
* ``("finish", last_seq)``: send the final figures and close everything; ``last_seq``
  (channel -> the last ``seq`` published) settles gaps announced after the last
  publication a client received.

It also measures its own event-loop lag: a client whose loop lags is the bottleneck,
and the latencies it records are inflated by that lag.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import random
import resource
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from loadtest.clients import SseClient, WsClient, connect_sse, connect_ws
from loadtest.dialects import Dialect, WsDialect
from loadtest.recorder import ConnState, Recorder
from loadtest.storm import Keeper, Keeping, ResumingWs, cut_all, failure_reason

LAG_TICK = 0.05
SLOW_CATCH_UP = 3.0


@dataclass
class ConnSpec:
    channel: str
    slow: bool = False
    local_ip: str | None = None
    token: str | None = None  # this connection's own token; None: the plan's


@dataclass
class WorkerPlan:
    index: int
    host: str
    port: int
    dialect: Dialect
    token: str
    conns: list[ConnSpec]
    n_steps: int
    t0: float
    connect_rate: float
    connect_concurrency: int = 200
    connect_timeout: float = 15.0
    slow_interval: float = 1.0
    slow_rcvbuf: int = 8192
    kernel_stamps: bool = False
    cpus: list[int] | None = None
    progress_interval: float = 0.25
    churn_local_ips: list[str | None] = field(default_factory=lambda: [None])
    # Several gateways behind one address each: every (re)connect picks one at random.
    ports: list[int] = field(default_factory=list)


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft


def worker_main(plan: WorkerPlan, pipe: Connection) -> None:
    """Process entry point (``multiprocessing`` spawn target)."""
    if plan.cpus:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, plan.cpus)
    raise_fd_limit()
    import uvloop

    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(Worker(plan, pipe).run())


Client = WsClient | SseClient


class Worker:
    def __init__(self, plan: WorkerPlan, pipe: Connection) -> None:
        self.plan = plan
        self.pipe = pipe
        self.recorder = Recorder(plan.n_steps, plan.t0)
        self.churn_sink = Recorder(plan.n_steps, plan.t0)  # churned conns' deliveries
        self.clients: list[Client] = []
        self.finish = asyncio.Event()
        self.lag_max = 0.0  # since the last progress message
        self.lag_by_second: dict[int, float] = {}
        self.tasks: set[asyncio.Task[Any]] = set()
        self.connect_window: tuple[float, float] | None = None  # wall time, first to last
        self.keepers: list[Keeper] = []
        self.last_seq: dict[str, int] | None = None
        self.keeping: Keeping | None = None

    # -- plumbing --------------------------------------------------------------------

    def send(self, message: tuple[Any, ...]) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.pipe.send(message)

    def spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def read_commands(self, loop: asyncio.AbstractEventLoop) -> None:
        """Reader thread: blocking ``recv`` (the pipe stays blocking: no ``add_reader``,
        which would make it non-blocking and break sends bigger than the pipe buffer)."""
        while True:
            try:
                command = self.pipe.recv()
            except (EOFError, OSError):
                break
            try:
                loop.call_soon_threadsafe(self.handle, command)
            except RuntimeError:  # the loop is closed
                return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self.finish.set)  # the coordinator went away

    def handle(self, command: tuple[Any, ...]) -> None:
        name = command[0]
        if name == "finish":
            self.last_seq = command[1] if len(command) > 1 else None
            self.finish.set()
        elif name == "step":
            k = command[1]
            self.send(
                (
                    "step",
                    k,
                    self.recorder.step_hists[k].to_state(),
                    self.recorder.unique_by_step[k],
                )
            )
        elif name == "churn":
            _, rate, duration, hold = command
            self.spawn(self.churn(rate, duration, hold))
        elif name == "keep":
            self.keep(command[1], command[2])
        elif name == "cut":
            self.spawn(self.cut(command[1]))
        elif name == "calm" and self.keeping is not None:
            self.keeping.calm = True

    async def report_progress(self) -> None:
        while True:
            await asyncio.sleep(self.plan.progress_interval)
            progress = self.recorder.progress()
            progress["lag_ms"] = round(self.lag_max * 1000, 1)
            self.lag_max = 0.0
            self.send(("progress", progress))

    async def watch_lag(self) -> None:
        loop = asyncio.get_running_loop()
        expected = loop.time() + LAG_TICK
        while True:
            await asyncio.sleep(LAG_TICK)
            now = loop.time()
            lag = max(0.0, now - expected)
            expected = now + LAG_TICK
            self.lag_max = max(self.lag_max, lag)
            second = int(time.time() - self.plan.t0)
            if lag > self.lag_by_second.get(second, 0.0):
                self.lag_by_second[second] = lag

    # -- connections -----------------------------------------------------------------

    async def open(self, spec: ConnSpec, recorder: Recorder) -> tuple[Client, ConnState]:
        return await open_connection(self.plan, spec, recorder)

    async def connect_all(self) -> None:
        """Staggered connects: at most ``connect_rate``/s and ``connect_concurrency`` at once.

        The first connection of each channel connects alone, before the others: servers
        that subscribe upstream on a channel's first subscriber may mishandle subscribers
        arriving while that is in flight (broadcaster's ``subscribe`` loses them), and
        that start-up race is not what a throughput run measures.
        """
        loop = asyncio.get_running_loop()
        limit = asyncio.Semaphore(self.plan.connect_concurrency)
        seen: set[str] = set()
        rest: list[ConnSpec] = []
        for spec in self.plan.conns:
            if spec.channel in seen:
                rest.append(spec)
                continue
            seen.add(spec.channel)
            await limit.acquire()
            await self.connect_one(spec, limit)
        started = loop.time()
        pending: set[asyncio.Task[None]] = set()
        for i, spec in enumerate(rest):
            delay = started + i / self.plan.connect_rate - loop.time()
            if delay > 0.002:
                await asyncio.sleep(delay)
            await limit.acquire()
            task = asyncio.create_task(self.connect_one(spec, limit))
            pending.add(task)
            task.add_done_callback(pending.discard)
        if pending:
            await asyncio.gather(*pending)

    async def connect_one(self, spec: ConnSpec, limit: asyncio.Semaphore) -> None:
        # perf_counter, not loop.time(): uvloop's clock counts whole milliseconds.
        began = time.perf_counter()
        try:
            client, _ = await self.open(spec, self.recorder)
        except Exception as exc:
            self.recorder.connect_failures[failure_reason(exc)] += 1
        else:
            self.recorder.connect_hist.record_us(int((time.perf_counter() - began) * 1e6))
            self.clients.append(client)
        finally:
            limit.release()

    async def churn(self, rate: float, duration: float, hold: float) -> None:
        """Connect, subscribe, hold ``hold`` s and close, ``rate`` times a second."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        channel = self.plan.conns[0].channel if self.plan.conns else "churn"
        ips = self.plan.churn_local_ips or [None]
        running: set[asyncio.Task[None]] = set()
        total = max(1, round(rate * duration))
        for i in range(total):
            delay = started + i / rate - loop.time()
            if delay > 0.002:
                await asyncio.sleep(delay)
            spec = ConnSpec(channel, local_ip=ips[i % len(ips)])
            task = asyncio.create_task(self.churn_one(spec, hold))
            running.add(task)
            task.add_done_callback(running.discard)
        if running:
            await asyncio.gather(*running)
        self.send(("churned", total))

    async def churn_one(self, spec: ConnSpec, hold: float) -> None:
        began = time.perf_counter()
        try:
            client, _ = await self.open(spec, self.churn_sink)
        except Exception as exc:
            self.recorder.churn_failures[failure_reason(exc)] += 1
            return
        self.recorder.churn_hist.record_us(int((time.perf_counter() - began) * 1e6))
        self.recorder.churn_ok += 1
        if hold > 0:
            await asyncio.sleep(hold)
        client.close()

    def keep(self, jitter_every: float, offline: float) -> None:
        dialect = self.plan.dialect
        assert isinstance(dialect, ResumingWs)
        self.recorder.resuming = True
        self.keeping = Keeping(self.plan, self.recorder, dialect.figures, jitter_every, offline)
        for client in self.clients:
            if isinstance(client, WsClient):
                keeper = Keeper(self.keeping, client)
                self.keepers.append(keeper)
                keeper.task = asyncio.create_task(keeper.run())

    async def cut(self, at: float) -> None:
        await asyncio.sleep(max(0.0, at - time.time()))
        cut = cut_all(self.keepers)
        self.send(("progress", self.recorder.progress()))  # no longer subscribed
        self.send(("cut", cut))

    def stop_keeping(self) -> None:
        """The end: no keeper reconnects any more; gaps announced after the last
        publication a client received are settled with what was published."""
        for keeper in self.keepers:
            if keeper.task is not None:
                keeper.task.cancel()
        if self.keepers:
            self.clients = [k.client for k in self.keepers]
        last_seq = self.last_seq or {}
        for keeper in self.keepers:
            dialect = keeper.client.dialect
            conn = keeper.client.conn
            if isinstance(dialect, ResumingWs) and dialect.gap is not None:
                dialect.judge(last_seq.get(conn.channel, conn.last) + 1, self.plan.n_steps - 1)

    async def catch_up(self, timeout: float = SLOW_CATCH_UP) -> None:
        """Let slow consumers read their backlog at full speed, so that a close the server
        queued behind it (e.g. 4008) is seen and counted; stop after ``timeout``."""
        slow = [c for c in self.clients if c.throttle is not None]
        for client in slow:
            client.unthrottle()
        deadline = asyncio.get_running_loop().time() + timeout
        while any(not c.conn.closed for c in slow):
            if asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.05)

    # -- main ------------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        threading.Thread(
            target=self.read_commands, args=(loop,), name="loadtest-commands", daemon=True
        ).start()
        self.spawn(self.report_progress())
        self.spawn(self.watch_lag())
        began = time.time()
        await self.connect_all()
        self.connect_window = (began, time.time())
        # Deliveries allocate short-lived dicts only (freed by reference counting); a full
        # collection over tens of thousands of connection objects would stall the loop
        # for tens of milliseconds and show up as latency.
        gc.collect()
        gc.freeze()
        gc.disable()
        progress = self.recorder.progress()
        progress["connect_window"] = self.connect_window
        self.send(("connected", progress))
        await self.finish.wait()
        self.stop_keeping()
        await self.catch_up()
        state = self.recorder.state()
        if self.keeping is not None:
            state["resume"] = self.keeping.figures.to_state()
            state["resume"]["clients"] = len(self.keepers)
            state["resume"]["connected_at_end"] = sum(1 for k in self.keepers if k.connected)
            state["resume"]["reconnected"] = sum(1 for k in self.keepers if k.reconnects)
        state["lag_by_second"] = self.lag_by_second
        state["worker"] = self.plan.index
        self.send(("final", state))
        for client in self.clients:
            client.close()
        await asyncio.sleep(0.2)
        for task in list(self.tasks):
            task.cancel()


async def open_connection(
    plan: WorkerPlan, spec: ConnSpec, recorder: Recorder
) -> tuple[Client, ConnState]:
    """Connect and subscribe one client as ``plan`` says; raises when that fails."""
    dialect = plan.dialect
    conn = recorder.add(spec.channel, spec.slow)
    options: dict[str, Any] = {
        "local_ip": spec.local_ip,
        "rcvbuf": plan.slow_rcvbuf if spec.slow else None,
        "slow_interval": plan.slow_interval if spec.slow else None,
        "timeout": plan.connect_timeout,
        "stamped": plan.kernel_stamps,
    }
    port = random.choice(plan.ports) if plan.ports else plan.port
    args = (plan.host, port, spec.token or plan.token, conn, recorder)
    client: Client
    if isinstance(dialect, WsDialect):
        client = await connect_ws(dialect.per_connection(), *args, **options)
    else:
        client = await connect_sse(dialect, *args, **options)
    return client, conn
