"""``hooks``: what the backend hooks (docs/protocol.md, "Backend hooks") cost one worker.

A backend that answers at once (``loadtest.hookserver``, its own process on the
load-generator CPUs) stands in for the application, and each figure is taken with and
without a hook, alternately, ``--rounds`` times (a noisy machine moves a figure by a
third from one hour to the next: compare within a round, report the range):

* **connects**: for each of ``--connect-variants`` a fresh gateway (``none``: no hook;
  ``connect``: a connect hook; ``subscribe``: a subscribe hook on every channel), and
  ``--clients`` clients that connect and subscribe as fast as it takes them, at most
  ``--concurrency`` at a time. Connects/s (from the first connect to the last
  subscribe reply), connect + subscribe latency, and the server's CPU per connect
  (``schedstat``, as ``connect`` measures it).
* **publishes**: one gateway with a publish hook on the channels ``*-hooked``;
  ``--publishers`` WebSocket connections keep ``--window`` ``publish`` commands each
  in flight (``loadtest.wspublish``) for ``--publish-duration`` s, to a channel the hook
  does not match (``plain``) and to one it does (``hooked``), alternately, on the same
  gateway. Publishes acknowledged per second, acknowledgement latency, the server's
  CPU per publish.

For every run the hook's own latency as the gateway saw it comes from the gateway's
``gateway_hook_seconds{hook}`` histogram (``_sum`` and ``_count`` read before and
after: its mean; the buckets are too coarse for percentiles), and the backend's
service time and request count from the backend itself. The report subtracts the
hook's mean from the client's latency: what is left is the gateway's own part. The
extra server CPU per connect or publish (the same round's run with the hook less the
one without) is what the hook costs the gateway besides the wait: building, sending
and parsing the HTTP call, and for an SSE stream the connect hook decides, the
framework's endpoint it then goes through.

``--py-spy DIR`` records a profile of the gateway during every run into DIR and adds
its top frames and the share of samples in the hook's HTTP client to the run's entry
(py-spy takes a part of the load generator's core: measure without it).
"""

from __future__ import annotations

import dataclasses
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from loadtest.config import Setup
from loadtest.harness import Harness
from loadtest.histogram import Histogram
from loadtest.hookreport import (
    PUBLISH_VARIANTS,
    delta,
    hook_figures,
    minus_hook,
    rounded,
    summarise,
)
from loadtest.hookserver import HookBackend
from loadtest.procstat import ProcessSampler, machine_info
from loadtest.profile import Profiler, shares
from loadtest.report import BUSY_PERCENT, SCHEMA, Merged, write_report
from loadtest.scenarios.connect import quiet_cpu
from loadtest.scenarios.idle import WARMUP_CONNECTIONS, warm_up
from loadtest.targets import TARGETS
from loadtest.wspublish import PublisherProcess, PublishPlan

HOOKED = "-hooked"  # the publish hook's channels end so
HOOK_METRICS = (
    "gateway_hook_seconds_sum",
    "gateway_hook_seconds_count",
    "gateway_hook_outcomes_total",
    "gateway_publications_total",
)
# Where a profile's samples are: the hooks' HTTP client (aiohttp and its parts; httpx
# and its, which the hooks used before), imports done while running (a failed
# ``import`` is searched for on every call), the hooks' own modules, the web framework
# (FastAPI's endpoint and Starlette's stack) and the metrics.
PROFILE_GROUPS = {
    "hook_http_client": (
        "aiohttp/", "yarl/", "multidict/", "httpx/", "httpcore/", "h11/", "anyio/",
    ),
    "imports_at_run_time": ("importlib._bootstrap",),
    "gateway_hooks_modules": ("gateway/hooks.py", "gateway/pooled_http.py"),
    "framework": ("fastapi/", "starlette/"),
    "prometheus_client": ("prometheus_client/",),
}  # fmt: skip
WARMUP_PUBLISH_S = 1.0


def hooks_setting(variant: str, backend: str, timeout: float) -> dict[str, Any]:
    """The ``GATEWAY_HOOKS`` of a variant (``{}``: none)."""
    if variant == "connect":
        return {"connect": {"url": f"{backend}/connect", "timeout": timeout}}
    if variant == "subscribe":
        return {"subscribe": {"url": f"{backend}/subscribe", "channels": ["*"], "timeout": timeout}}
    if variant == "publish":
        hook = {"url": f"{backend}/publish", "channels": [f"*{HOOKED}"], "timeout": timeout}
        return {"publish": hook}
    return {}


def hook_of(variant: str) -> str | None:
    return {"connect": "connect", "subscribe": "subscribe", "hooked": "publish"}.get(variant)


def with_hooks(setup: Setup, hooks: dict[str, Any]) -> Setup:
    env = dict(setup.server_env)
    if hooks:
        env["GATEWAY_HOOKS"] = orjson.dumps(hooks).decode()
    return dataclasses.replace(setup, server_env=env)


def loadgen_cpu(h: Harness, start: float, end: float) -> dict[str, Any]:
    cpu: dict[str, float] = {}
    for name, sampler in h.loadgen_samplers.items():
        value = sampler.utilisation(start, end)
        if value is not None:
            cpu[name] = round(value, 1)
    busy = [f"{name} at {value:.0f}% CPU" for name, value in cpu.items() if value > BUSY_PERCENT]
    return {
        "cpu_percent": cpu,
        "cpus": h.loadgen_cpus,
        "machine_cpu_busy_percent": h.machine.busy(start, end),
        "bottleneck": bool(busy),
        "bottleneck_reasons": busy,
    }


class Profiling:
    """A py-spy profile of the gateway for one run (nothing without ``--py-spy``)."""

    def __init__(self, directory: Path | None, h: Harness, name: str) -> None:
        self.profiler: Profiler | None = None
        if directory is not None and h.server_sampler is not None:
            raw = directory / f"{name}.raw"
            self.profiler = Profiler(h.server_sampler.pid, raw, cpus=h.loadgen_cpus)

    def start(self, max_seconds: float) -> None:
        if self.profiler is not None:
            self.profiler.start(max_seconds)

    def stop(self) -> dict[str, Any] | None:
        if self.profiler is None:
            return None
        summary = self.profiler.stop()
        if summary is None:
            return {"error": self.profiler.error}
        return {
            "samples": summary["samples"],
            "raw": summary["raw"],
            "groups": shares(self.profiler.out, PROFILE_GROUPS),
            "self": summary["self"][:10],
            "total": summary["total"][:25],
        }


def startup_failure(exc: Exception) -> str | None:
    """Why the gateway refused to start (a hook it does not know), or None."""
    text = str(exc)
    if "exited during start-up" not in text:
        return None
    lines = [line for line in text.splitlines() if "GATEWAY_HOOKS" in line]
    return (lines[-1] if lines else text.splitlines()[0]).strip()[:300]


# -- connects ----------------------------------------------------------------------------


async def connect_run(
    setup: Setup,
    backend: HookBackend,
    *,
    variant: str,
    round_: int,
    clients: int,
    hook_timeout: float,
    profile_dir: Path | None,
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "part": "connects",
        "variant": variant,
        "round": round_,
        "transport": setup.transport,
    }
    hooks = hooks_setting(variant, backend.url, hook_timeout)
    entry["hooks_setting"] = hooks
    try:
        async with Harness(with_hooks(setup, hooks), "hooks") as h:
            assert h.server_sampler is not None
            pid = h.server_sampler.pid
            h.loadgen_samplers["hook-backend"] = ProcessSampler(backend.server.pid)
            h.progress.note(f"connects, round {round_ + 1}: {variant}")
            await warm_up(h, WARMUP_CONNECTIONS)
            await backend.reset()
            before = await h.gateway_metrics(HOOK_METRICS)
            specs = h.specs([h.channel()] * clients, slow_share=0)
            profiling = Profiling(profile_dir, h, f"connects-{variant}-{round_ + 1}")
            start_cpu = await quiet_cpu(pid)
            profiling.start(60)
            began = time.time()
            connect = await h.connect(specs, n_steps=1)
            ended = time.time()
            h.status = lambda: ("settling", None, "")
            end_cpu = await quiet_cpu(pid)
            entry["profile"] = profiling.stop()
            after = await h.gateway_metrics(HOOK_METRICS)
            served = await backend.stats()
            loadgen = loadgen_cpu(h, began, ended)
            assert h.pool is not None
            merged = Merged.of(await h.pool.finish())
    except RuntimeError as exc:
        reason = startup_failure(exc)
        if reason is None:
            raise
        entry["skipped"] = f"the gateway did not start with this hook: {reason}"
        return entry
    subscribed = merged.connect_hist.total
    latency = merged.connect_hist.summary_ms()
    hook = hook_figures(hook_of(variant), before, after)
    connecting = connect.get("connecting_s") or connect["elapsed_s"]
    entry.update(
        clients=clients,
        subscribed=subscribed,
        failed=sum(merged.connect_failures.values()),
        failures=dict(merged.connect_failures),
        connecting_s=round(connecting, 3),
        connects_per_s=round(subscribed / connecting, 1) if connecting else None,
        latency_ms=latency,
        server_cpu_us_per_connect=round((end_cpu - start_cpu) / max(1, subscribed) * 1e6, 1),
        hook=hook,
        latency_minus_hook_ms=minus_hook(latency, hook),
        backend=served,
        loadgen=loadgen,
    )
    if entry["profile"] is None:
        del entry["profile"]
    return entry


# -- publishes ---------------------------------------------------------------------------


async def publish_run(
    h: Harness,
    backend: HookBackend,
    *,
    variant: str,
    round_: int,
    channel: str,
    publishers: int,
    window: int,
    duration: float,
    profile_dir: Path | None,
) -> dict[str, Any]:
    assert h.server_sampler is not None
    pid = h.server_sampler.pid
    plan = PublishPlan(
        host=h.host,
        port=h.port,
        token=h.token,
        channel=channel,
        publishers=publishers,
        window=window,
        duration=duration,
        pad_bytes=h.setup.pad_bytes,
        connect_timeout=h.setup.connect_timeout,
        cpus=h.loadgen_cpus,
    )
    proc = PublisherProcess(plan)
    try:
        if proc.pid is not None:
            h.loadgen_samplers["publishers"] = ProcessSampler(proc.pid)
        connected, failures = await proc.ready(h.setup.connect_timeout + 30)
        await backend.reset()
        before = await h.gateway_metrics(HOOK_METRICS)
        name = f"publishes-{variant}-{round_ + 1}" if round_ >= 0 else ""
        profiling = Profiling(profile_dir if name else None, h, name)
        start_cpu = await quiet_cpu(pid)
        profiling.start(duration + 30)
        began = time.time()

        def status() -> tuple[str, float | None, str]:
            elapsed = time.time() - began
            rate = proc.acked / elapsed if elapsed > 0 else 0.0
            return (
                f"publishing {variant}",
                min(1.0, elapsed / duration),
                f"{proc.acked:,} acknowledged, {rate:,.0f}/s",
            )

        h.status = status
        figures = await proc.run(duration + 30)
        ended = time.time()
        h.status = lambda: ("settling", None, "")
        end_cpu = await quiet_cpu(pid)
        profile = profiling.stop()
        after = await h.gateway_metrics(HOOK_METRICS)
        served = await backend.stats()
        loadgen = loadgen_cpu(h, began, ended)
    finally:
        await proc.close()
        h.loadgen_samplers.pop("publishers", None)
    latency = Histogram.from_state(figures.pop("latency")).summary_ms()
    acked = figures["acked"]
    hook = hook_figures(hook_of(variant), before, after)
    elapsed = figures["elapsed_s"]
    entry: dict[str, Any] = {
        "part": "publishes",
        "variant": variant,
        "round": round_,
        "channel": channel,
        "connected": connected,
        "connect_failures": failures,
        **figures,
        "publishes_per_s": round(acked / elapsed, 1) if elapsed else None,
        "latency_ms": latency,
        "server_cpu_us_per_publish": round((end_cpu - start_cpu) / max(1, acked) * 1e6, 1),
        "published": int(delta(before, after, "gateway_publications_total")),
        "hook": hook,
        "latency_minus_hook_ms": minus_hook(latency, hook),
        "backend": served,
        "loadgen": loadgen,
    }
    if profile is not None:
        entry["profile"] = profile
    return entry


async def publish_runs(
    setup: Setup,
    backend: HookBackend,
    *,
    rounds: int,
    publishers: int,
    window: int,
    duration: float,
    hook_timeout: float,
    profile_dir: Path | None,
) -> list[dict[str, Any]]:
    """Alternately plain and hooked, on one gateway (one process: less noise between them)."""
    hooks = hooks_setting("publish", backend.url, hook_timeout)
    runs: list[dict[str, Any]] = []
    async with Harness(with_hooks(setup, hooks), "hooks") as h:
        h.loadgen_samplers["hook-backend"] = ProcessSampler(backend.server.pid)
        channels = {"plain": f"{h.channel()}-plain", "hooked": f"{h.channel()}{HOOKED}"}
        # Warm-up: imports done on first use, the hook client's pool of connections.
        for variant in PUBLISH_VARIANTS:
            await publish_run(
                h, backend, variant=variant, round_=-1, channel=channels[variant],
                publishers=publishers, window=window, duration=min(duration, WARMUP_PUBLISH_S),
                profile_dir=None,
            )  # fmt: skip
        for round_ in range(rounds):
            for variant in PUBLISH_VARIANTS:
                h.progress.note(f"publishes, round {round_ + 1}: {variant}")
                entry = await publish_run(
                    h, backend, variant=variant, round_=round_, channel=channels[variant],
                    publishers=publishers, window=window, duration=duration,
                    profile_dir=profile_dir,
                )  # fmt: skip
                entry["hooks_setting"] = hooks
                runs.append(entry)
    return runs


# -- the report --------------------------------------------------------------------------


def output_paths(setup: Setup, t0: float) -> tuple[Path, Path | None]:
    stamp = datetime.fromtimestamp(t0).strftime("%Y%m%d-%H%M%S")
    name = f"hooks-gateway-{setup.transport}-{stamp}.json"
    json_path = setup.out or Path("loadtest-results") / name
    plot_path = None if setup.no_plot else (setup.plot or json_path.with_suffix(".png"))
    return json_path, plot_path


async def run_hooks(
    setup: Setup,
    *,
    parts: list[str],
    clients: int,
    concurrency: int,
    connect_variants: list[str],
    publishers: int,
    window: int,
    publish_duration: float,
    rounds: int,
    hook_timeout: float,
    profile_dir: Path | None = None,
) -> dict[str, Any]:
    if setup.url is not None or setup.target != "gateway":
        raise SystemExit("hooks starts its own gateways, one per hook setting (no --url)")
    setup = dataclasses.replace(setup, connect_concurrency=concurrency)
    t0 = time.time()
    config = {
        "parts": parts,
        "clients": clients,
        "concurrency": concurrency,
        "connect_variants": connect_variants,
        "publishers": publishers,
        "window": window,
        "publish_duration_s": publish_duration,
        "rounds": rounds,
        "hook_timeout_s": hook_timeout,
        "pad_bytes": setup.pad_bytes,
        "py_spy": str(profile_dir) if profile_dir else None,
    }
    server_cpus, loadgen_cpus = setup.resolved_cpus(True)
    backend = HookBackend(loadgen_cpus)
    await backend.start()
    connects: list[dict[str, Any]] = []
    publishes: list[dict[str, Any]] = []
    try:
        if "connects" in parts:
            for round_ in range(rounds):
                for variant in connect_variants:
                    connects.append(
                        await connect_run(
                            setup, backend, variant=variant, round_=round_, clients=clients,
                            hook_timeout=hook_timeout, profile_dir=profile_dir,
                        )
                    )  # fmt: skip
        if "publishes" in parts:
            publishes = await publish_runs(
                setup, backend, rounds=rounds, publishers=publishers, window=window,
                duration=publish_duration, hook_timeout=hook_timeout, profile_dir=profile_dir,
            )  # fmt: skip
    finally:
        await backend.stop()
    notes: list[str] = []
    for run in connects + publishes:
        if run.get("skipped"):
            notes.append(f"{run['part']} {run['variant']} skipped: {run['skipped']}")
        elif run["loadgen"]["bottleneck"]:
            notes.append(
                f"{run['part']} {run['variant']} round {run['round'] + 1}: load generator busy "
                f"({'; '.join(run['loadgen']['bottleneck_reasons'])})"
            )
    target = TARGETS["gateway"]
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "tool": "loadtest",
        "scenario": "hooks",
        "started_at": t0,
        "command": setup.command,
        "target": {
            "name": target.name,
            "description": target.description,
            "transport": setup.transport,
            "publish_via": "ws",
            "broker": setup.broker,
        },
        "server": {"cpus": server_cpus, "loadgen_cpus": loadgen_cpus},
        "machine": machine_info(),
        "config": config,
        "hook_backend": {"what": "loadtest.hookserver (asyncio + httptools, keep-alive)"},
        "connects": connects,
        "publishes": publishes,
        "summary": rounded(
            {
                "connects": summarise(
                    connects, "none", "connects_per_s", "server_cpu_us_per_connect"
                ),
                "publishes": summarise(
                    publishes, "plain", "publishes_per_s", "server_cpu_us_per_publish"
                ),
            }
        ),
        "notes": notes,
    }
    json_path, plot_path = output_paths(setup, t0)
    files: dict[str, str | None] = {"json": str(json_path), "plot": None}
    if plot_path is not None:
        from loadtest.plot import plot_hooks

        if plot_hooks(report, plot_path):
            files["plot"] = str(plot_path)
    report["files"] = files
    write_report(report, json_path)
    return report
