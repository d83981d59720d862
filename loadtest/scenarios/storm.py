"""``storm``: every client's connection cut at the same instant by a TCP reset, and every
client straight back, resuming from the last offset it received (``loadtest.storm``):
what a load balancer reload or a crashed pod does to a gateway's clients.

A publisher keeps publishing on a few channels throughout. The report says how long
the clients took to be subscribed again (p50 / p95 / p99 from the cut), whether any
publication was lost, duplicated or reordered across the cut (the recorder's checks
span it: a resumed connection carries on its predecessor's count), what the gateway
answered to the resumes (recovered or not) and which connect attempts failed. For
several gateway workers behind Redis start them with ``--server-env
GATEWAY_WORKERS=3 --broker redis``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from pathlib import Path
from typing import Any

from loadtest.config import Setup
from loadtest.harness import Harness
from loadtest.histogram import Histogram
from loadtest.procstat import cpu_seconds
from loadtest.scenarios.common import finish_report, run_steps, save
from loadtest.storm import ResumingWs


async def run_storm(
    setup: Setup,
    *,
    clients: int,
    channels: int,
    rate: float,
    duration: float,
    cut_after: float,
    settle: float = 1.0,
) -> dict[str, Any]:
    config = {
        "clients": clients,
        "channels": channels,
        "rate": rate,
        "duration_s": duration,
        "cut_after_s": cut_after,
        "pad_bytes": setup.pad_bytes,
        "p99_limit_ms": setup.p99_limit_ms,
    }
    if setup.transport != "ws":
        raise SystemExit("storm resumes WebSocket clients (--transport ws)")
    async with Harness(setup, "storm") as h:
        if h.target.name != "gateway":
            raise SystemExit("storm resumes from offsets: the gateway only")
        h.dialect = ResumingWs()
        names = [h.channel(i) for i in range(channels)]
        specs = h.specs([names[i % channels] for i in range(clients)], slow_share=0)
        connect = await h.connect(specs, n_steps=1)
        pool = h.pool
        assert pool is not None
        await asyncio.sleep(settle)
        at = time.time() + cut_after
        pool.send(("storm", at))
        pid = h.server_sampler.pid if h.server_sampler is not None else None
        cpu = asyncio.create_task(storm_cpu(pid, at, pool.storm_finished)) if pid else None
        runs, rp = await run_steps(h, names, [rate], duration, stop_on_fail=False)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(pool.storm_finished.wait(), 90)
        report, _ = await finish_report(h, "storm", config, clients, connect, runs, rp)
        back = Histogram()
        recovered: Counter[str] = Counter()
        failures: Counter[str] = Counter()
        for figures in pool.stormed:
            back.merge(Histogram.from_state(figures["back"]))
            recovered.update(figures["recovered"])
            failures.update(figures["failures"])
        report["storm"] = {
            "clients_cut": sum(f["clients"] for f in pool.stormed),
            "clients_back": back.total,
            "workers_reported": len(pool.stormed),
            "back_ms": back.summary_ms(),
            "recovered": dict(recovered),
            "failed_attempts": dict(failures),
        }
        if cpu is not None:
            seconds = await cpu
            if seconds is not None and back.total:
                report["storm"]["server_cpu_ms_per_client_back"] = round(
                    seconds / back.total * 1000, 3
                )
        return save(h, "storm", report)


def tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and its children (the workers of ``--workers N``)."""
    total = cpu_seconds(pid)
    with contextlib.suppress(OSError):
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            with contextlib.suppress(OSError, ValueError):
                total += cpu_seconds(int(child))
    return total


async def storm_cpu(pid: int, at: float, finished: asyncio.Event) -> float | None:
    """The server's CPU from the cut until every client is back, less what the steady
    publishing costs in that time (measured over the second before the cut)."""
    await asyncio.sleep(max(0.0, at - 1.0 - time.time()))
    before, began = tree_cpu(pid), time.time()
    await asyncio.sleep(max(0.0, at - time.time()))
    cut, steady = tree_cpu(pid), (tree_cpu(pid) - before) / max(1e-3, time.time() - began)
    try:
        await asyncio.wait_for(finished.wait(), 90)
    except TimeoutError:
        return None
    return max(0.0, tree_cpu(pid) - cut - steady * (time.time() - at))
