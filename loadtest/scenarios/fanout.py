"""``fanout``: N subscribers on one channel, publications at stepped fixed rates."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from loadtest.config import Setup
from loadtest.harness import Harness
from loadtest.procstat import ProcessSampler
from loadtest.profile import Profiler
from loadtest.scenarios.common import finish_report, run_steps, save


async def run_fanout(
    setup: Setup,
    *,
    clients: int,
    rates: list[float],
    step_duration: float,
    stop_on_fail: bool = False,
    settle: float = 1.0,
    profile: Path | None = None,
) -> dict[str, Any]:
    """With ``profile``, py-spy records the server while the steps run (raw stacks there,
    the top frames in the report's ``profile``)."""
    config = {
        "clients": clients,
        "rates": rates,
        "step_duration_s": step_duration,
        "stop_on_fail": stop_on_fail,
        "slow_share": setup.slow_share,
        "pad_bytes": setup.pad_bytes,
        "p99_limit_ms": setup.p99_limit_ms,
    }
    async with Harness(setup, "fanout") as h:
        channel = h.channel()
        connect = await h.connect(h.specs([channel] * clients), n_steps=len(rates))
        await asyncio.sleep(settle)
        profiler = None
        if profile is not None and h.server_sampler is not None:
            profiler = Profiler(h.server_sampler.pid, profile, cpus=h.loadgen_cpus)
            longest = len(rates) * (step_duration + setup.drain_timeout + 2) + 10
            if not profiler.start(longest):
                h.notes.append(f"no profile: {profiler.error}")
                profiler = None
            elif profiler.proc is not None:
                h.loadgen_samplers["py-spy"] = ProcessSampler(profiler.proc.pid)
        try:
            runs, rp = await run_steps(
                h, [channel], rates, step_duration, stop_on_fail=stop_on_fail
            )
        finally:
            summary = profiler.stop() if profiler is not None else None
        report, _ = await finish_report(h, "fanout", config, clients, connect, runs, rp)
        if summary is not None:
            report["profile"] = summary
        elif profiler is not None:
            h.notes.append(f"no profile: {profiler.error}")
        return save(h, "fanout", report)
