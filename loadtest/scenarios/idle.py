"""``idle``: N subscribed connections held open; the server's memory per connection.

Memory per connection is (RSS with the connections - RSS before) / connections. Before
measuring the baseline, a few connections are opened and closed, so that code imported
lazily and caches filled on first use are not charged to the idle connections.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from loadtest.config import Setup
from loadtest.harness import Harness
from loadtest.procstat import rss_kib
from loadtest.recorder import Recorder
from loadtest.scenarios.common import finish_report, save
from loadtest.worker import ConnSpec, WorkerPlan, open_connection

WARMUP_CONNECTIONS = 20


def coordinator_plan(h: Harness) -> WorkerPlan:
    """A plan for connections the coordinator opens itself, outside the workers."""
    return WorkerPlan(
        index=-1,
        host=h.host,
        port=h.port,
        dialect=h.dialect,
        token=h.token,
        conns=[],
        n_steps=1,
        t0=h.t0,
        connect_rate=1000,
    )


async def warm_up(h: Harness, n: int) -> None:
    """Open and close ``n`` connections from the coordinator itself."""
    plan = coordinator_plan(h)
    recorder = Recorder(1, h.t0)
    spec = ConnSpec(h.channel(999))
    results = await asyncio.gather(
        *(open_connection(plan, spec, recorder) for _ in range(n)), return_exceptions=True
    )
    for result in results:
        if isinstance(result, tuple):
            result[0].close()
    await asyncio.sleep(0.5)


async def steady_rss(pid: int, seconds: float = 1.0) -> int:
    """Median RSS (KiB) over ``seconds``."""
    values = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        values.append(rss_kib(pid))
        await asyncio.sleep(0.1)
    values.sort()
    return values[len(values) // 2]


async def run_idle(
    setup: Setup, *, clients: int, hold: float, settle: float = 3.0
) -> dict[str, Any]:
    config = {"clients": clients, "hold_s": hold, "settle_s": settle}
    async with Harness(setup, "idle") as h:
        pid = h.server_sampler.pid if h.server_sampler is not None else None
        await warm_up(h, WARMUP_CONNECTIONS)
        before = await steady_rss(pid) if pid else None
        connect = await h.connect(h.specs([h.channel()] * clients, slow_share=0), n_steps=1)
        h.status = lambda: ("settling", None, "")
        await asyncio.sleep(settle)
        after = await steady_rss(pid) if pid else None
        held_from = time.time()
        if hold > 0:
            end = time.time() + hold
            h.status = lambda: ("holding", 1 - (end - time.time()) / hold, "")
            await asyncio.sleep(hold)
        held_until = time.time()
        at_end = await steady_rss(pid, 0.3) if pid else None
        report, merged = await finish_report(h, "idle", config, clients, connect, [], None)
        open_conns = sum(merged.alive.values())
        idle: dict[str, Any] = {"connections": open_conns}
        if before is not None and after is not None and at_end is not None:
            cpu = h.server_sampler.utilisation(held_from, held_until) if h.server_sampler else None
            idle.update(
                rss_before_mib=round(before / 1024, 1),
                rss_after_mib=round(after / 1024, 1),
                rss_end_mib=round(at_end / 1024, 1),
                per_connection_kib=round((after - before) / open_conns, 2) if open_conns else None,
                server_cpu_percent_idle=round(cpu, 1) if cpu is not None else None,
            )
        report["idle"] = idle
        return save(h, "idle", report)
