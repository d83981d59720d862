"""What the scenarios share: stepped publishing, and turning a finished run into a report."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from loadtest.harness import Harness
from loadtest.plot import plot_report
from loadtest.publisher import RatePublisher
from loadtest.report import (
    Merged,
    base_report,
    connections_entry,
    deliveries_entry,
    step_entry,
    summary_entry,
    timeseries,
    write_report,
)

GAP_BETWEEN_STEPS = 0.5


@dataclass
class StepRun:
    index: int
    rate: float
    window: tuple[float, float, float]  # start, end of publishing, end of drain
    publish: dict[str, Any]
    published: dict[str, int]
    drained: bool


class RateMeter:
    """Deliveries per second from successive cumulative counts (for the progress bar)."""

    def __init__(self) -> None:
        self.last: tuple[float, int] | None = None
        self.rate = 0.0

    def update(self, count: int) -> float:
        now = time.monotonic()
        if self.last is not None and now - self.last[0] >= 0.5:
            self.rate = (count - self.last[1]) / (now - self.last[0])
            self.last = (now, count)
        elif self.last is None:
            self.last = (now, count)
        return self.rate


async def run_steps(
    h: Harness,
    channels: list[str],
    rates: list[float],
    duration: float,
    *,
    stop_on_fail: bool,
    lanes: int = 1,
) -> tuple[list[StepRun], RatePublisher]:
    """Publish each rate for ``duration`` s, wait for deliveries to drain, check the step.

    With ``stop_on_fail`` the run ends after the first step that lost messages, missed
    the p99 limit or could not publish at its rate: higher rates would only fail harder.
    """
    assert h.pool is not None
    pool = h.pool
    rp = RatePublisher(h.publisher(), channels, h.setup.pad_bytes, lanes)
    runs: list[StepRun] = []
    meter = RateMeter()
    try:
        for k, rate in enumerate(rates):
            if not h.server_alive():
                h.notes.append(f"the server exited before step {k} ({rate:g}/s)")
                break
            started = time.time()

            def status(k: int = k, rate: float = rate, started: float = started) -> Any:
                totals = pool.totals()
                per_s = meter.update(totals["received"])
                elapsed = time.time() - started
                phase = "publishing" if elapsed <= duration else "draining"
                return (
                    f"step {k + 1}/{len(rates)} {rate:g}/s {phase}",
                    min(1.0, elapsed / duration),
                    f"{per_s:,.0f} deliveries/s, {totals['ready']:,} subscribed, "
                    f"{totals['closed']} closed, client lag {totals['lag_ms']:.0f} ms",
                )

            h.status = status
            publish = await rp.run_step(k, rate, duration)
            publish_end = time.time()
            published = rp.published_in(k)
            drained = await h.drain(k, published, h.setup.drain_timeout)
            run = StepRun(k, rate, (started, publish_end, time.time()), publish, published, drained)
            runs.append(run)
            verdict = await quick_verdict(h, run)
            h.progress.note(f"step {k + 1}/{len(rates)} {rate:g}/s: {verdict or 'ok'}")
            if verdict and stop_on_fail:
                break
            await asyncio.sleep(GAP_BETWEEN_STEPS)
    finally:
        if rp.errors:
            h.notes.append(f"publish errors: {dict(rp.errors)}")
        await rp.publisher.close()
    return runs, rp


async def quick_verdict(h: Harness, run: StepRun) -> str:
    """Why the step failed, from the workers' figures so far ('' when it passed)."""
    assert h.pool is not None
    hist, _ = await h.pool.step_stats(run.index)
    problems = []
    if not run.drained:
        problems.append("not everything delivered")
    p99 = hist.percentile_us(0.99) / 1000
    if p99 >= h.setup.p99_limit_ms:
        problems.append(f"p99 {p99:.0f} ms")
    if run.publish["achieved_rate"] < 0.95 * run.publish["target_rate"]:
        problems.append(f"published only {run.publish['achieved_rate']:.1f}/s")
    return ", ".join(problems)


async def finish_report(
    h: Harness,
    scenario: str,
    config: dict[str, Any],
    requested: int,
    connect: dict[str, Any],
    runs: list[StepRun],
    rp: RatePublisher | None,
) -> tuple[dict[str, Any], Merged]:
    """Collect the workers' figures and assemble the report (call inside the harness)."""
    assert h.pool is not None
    h.status = None
    h.sample()
    server_metrics = await h.gateway_metrics()  # before the clients leave
    finals = await h.pool.finish(last_seq=dict(rp.seq) if rp is not None else None)
    merged = Merged.of(finals)
    steps = [step_entry(h, merged, r.index, r.window, r.publish, r.published) for r in runs]
    report = base_report(h, scenario, config)
    report["connections"] = connections_entry(merged, requested, connect)
    report["steps"] = steps
    report["deliveries"] = deliveries_entry(merged, steps)
    report["summary"] = summary_entry(steps, merged)
    report["timeseries"] = timeseries(h, merged)
    if server_metrics:
        report["server_metrics"] = server_metrics
    if rp is not None:
        report["publisher"] = {
            "via": h.publish_via,
            "errors": dict(rp.errors),
            "call_latency_ms": rp.latency.summary_ms(),
        }
    for step in steps:
        for text in step["contention"]:
            h.notes.append(f"at {step['rate']:g}/s the {text}")
        if step["loadgen"]["bottleneck"]:
            h.notes.append(
                f"load generator was the bottleneck at {step['rate']:g}/s: "
                + "; ".join(step["loadgen"]["bottleneck_reasons"])
            )
    return report, merged


def output_paths(h: Harness, scenario: str) -> tuple[Path, Path | None]:
    setup = h.setup
    stamp = datetime.fromtimestamp(h.t0).strftime("%Y%m%d-%H%M%S")
    name = f"{scenario}-{h.target.name}-{setup.transport}-{stamp}"
    json_path = setup.out or Path("loadtest-results") / f"{name}.json"
    plot_path = None if setup.no_plot else (setup.plot or json_path.with_suffix(".png"))
    return json_path, plot_path


def save(h: Harness, scenario: str, report: dict[str, Any]) -> dict[str, Any]:
    json_path, plot_path = output_paths(h, scenario)
    files: dict[str, str | None] = {"json": str(json_path), "plot": None}
    if plot_path is not None and plot_report(report, plot_path):
        files["plot"] = str(plot_path)
    report["files"] = files
    write_report(report, json_path)
    return report
