"""``churn``: connections opened, subscribed and closed at a fixed rate while steady
subscribers on the same channel receive publications; shows what churn costs the server
and whether it disturbs the connections that stay."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from loadtest.config import Setup
from loadtest.harness import Harness
from loadtest.scenarios.common import finish_report, run_steps, save


async def run_churn(
    setup: Setup,
    *,
    clients: int,
    churn_rate: float,
    duration: float,
    rate: float,
    hold: float = 0.0,
    settle: float = 1.0,
) -> dict[str, Any]:
    config = {
        "clients": clients,
        "churn_rate": churn_rate,
        "duration_s": duration,
        "rate": rate,
        "hold_s": hold,
        "pad_bytes": setup.pad_bytes,
        "p99_limit_ms": setup.p99_limit_ms,
    }
    async with Harness(setup, "churn") as h:
        channel = h.channel()
        connect = await h.connect(h.specs([channel] * clients), n_steps=1)
        pool = h.pool
        assert pool is not None
        await asyncio.sleep(settle)
        workers = len(pool.plans)
        began = time.time()
        pool.send(("churn", churn_rate / workers, duration, hold))
        runs, rp = await run_steps(h, [channel], [rate], duration, stop_on_fail=False)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(
                pool.churn_finished.wait(), max(1.0, began + duration + 30 - time.time())
            )
        churn_elapsed = time.time() - began if pool.churn_done >= workers else duration
        report, merged = await finish_report(h, "churn", config, clients, connect, runs, rp)
        attempted = pool.churned
        report["churn"] = {
            "rate": churn_rate,
            "duration_s": duration,
            "attempted": attempted,
            "succeeded": merged.churn_ok,
            "failed": sum(merged.churn_failures.values()),
            "failures": dict(merged.churn_failures),
            "achieved_rate": round(merged.churn_ok / max(duration, churn_elapsed), 1),
            "connect_latency_ms": merged.churn_hist.summary_ms(),
        }
        return save(h, "churn", report)
