"""``fanout``: N subscribers on one channel, publications at stepped fixed rates."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from loadtest import callgrind
from loadtest.config import Setup
from loadtest.harness import Harness
from loadtest.procstat import ProcessSampler
from loadtest.profile import Profiler
from loadtest.scenarios.common import finish_report, run_steps, save
from loadtest.tracing import breakdown, breakdown_lines, forget_trace, read_trace


async def run_fanout(
    setup: Setup,
    *,
    clients: int,
    rates: list[float],
    step_duration: float,
    stop_on_fail: bool = False,
    settle: float = 1.0,
    profile: Path | None = None,
    trace: Path | None = None,
    instructions: bool = False,
) -> dict[str, Any]:
    """With ``profile``, py-spy records the server while the steps run (raw stacks there,
    the top frames in the report's ``profile``). With ``trace`` (a gateway the tool
    starts), the gateway runs under ``loadtest.tracing``: its trace goes to ``trace`` and
    the latency breakdown per step into the report's ``breakdown``. With ``instructions``
    the server runs under callgrind (``loadtest.callgrind``): the report's
    ``instructions`` gives its user-space instructions per delivery over the steps (the
    server runs some 50 times slower: latencies are not the point then)."""
    out = None
    if instructions:
        setup, out = callgrind.prepare(setup)
    if trace is not None:
        forget_trace(trace)
        setup = replace(setup, server_env={**setup.server_env, "LOADTEST_TRACE": str(trace)})
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
        counter = callgrind.Counter(h.server_sampler.pid, out) if out and h.server_sampler else None
        if counter is not None:
            await counter.start()
        try:
            runs, rp = await run_steps(
                h, [channel], rates, step_duration, stop_on_fail=stop_on_fail
            )
        finally:
            summary = profiler.stop() if profiler is not None else None
        counted = await counter.phase() if counter is not None else None
        report, _ = await finish_report(h, "fanout", config, clients, connect, runs, rp)
        if counted is not None:
            delivered = sum(run["delivered"] for run in report["steps"])
            report["instructions"] = {
                "total": counted,
                "delivered": delivered,
                "per_delivery": round(counted / max(1, delivered)),
            }
        if trace is not None:
            await _add_breakdown(h, report, trace)
        if summary is not None:
            report["profile"] = summary
        elif profiler is not None:
            h.notes.append(f"no profile: {profiler.error}")
        return save(h, "fanout", report)


async def _add_breakdown(h: Harness, report: dict[str, Any], trace: Path) -> None:
    """Ask the traced gateway for its trace (SIGUSR1) and put the breakdown in ``report``."""
    if h.server is None or h.setup.target != "gateway":
        h.notes.append("no trace: --trace needs a gateway the tool starts")
        return
    os.kill(h.server.pid, signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while (found := read_trace(trace)) is None:
        if time.monotonic() > deadline:
            h.notes.append(f"no trace: the gateway wrote nothing to {trace}")
            return
        await asyncio.sleep(0.05)
    rows = breakdown(found, report)
    report["breakdown"] = rows
    for line in breakdown_lines(rows):
        h.progress.note(line)
