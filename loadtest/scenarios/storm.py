"""``storm``: WebSocket clients that resume from their last offset (``loadtest.storm``)
while their connections, gateways or Redis are taken away from them, one ``--mode``:

* ``cut``: ``--cut-after`` s into publishing every connection is reset at once (TCP
  RST) and every client comes straight back: a load balancer reload;
* ``jitter``: every client resets its own connection at random about every
  ``--jitter-every`` s (default 15) and stays offline about ``--offline`` s before it
  reconnects;
* ``deploy``: a rolling restart of the gateways (``--gateways N``): each in turn gets
  SIGTERM, drains (close 1012), exits and starts again, ``--restart-pause`` s apart;
* ``crash``: one gateway is killed (SIGKILL) at ``--cut-after``, and started again
  ``--restart-pause`` s later, as a process manager would;
* ``redis-restart``: the redis-server the tool started is stopped and, ``--redis-down``
  s later, started again empty: every channel's history and epoch are gone. The clients
  jitter meanwhile (``--jitter-every`` 15 by default), so that some resume from
  positions of the lost epochs.

A publisher keeps publishing on ``--channels`` channels throughout (through the
gateways' Redis broker with ``--gateways N``). Every client keeps coming back until the
end (``loadtest.storm.Keeper``, ``client.js``'s delays), so the recorder's checks - every
publication once, in order - span its whole life, and the publications it skipped
across a gap the gateway announced (``recovered: false``, a new epoch) are counted apart
from lost ones. The report adds, under ``storm``: reconnects and how long they took
(from the first attempt, and from the moment the connection was lost), replay time
(subscribe reply to the last replayed publication), recovered or not, the announced gaps
and whether each was real, why connections ended and attempts failed, each gateway
process's peak RSS and CPU, memory after the disruption against before it, and the
issue's targets met or missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loadtest.config import Setup
from loadtest.harness import Harness
from loadtest.procstat import ProcessSampler
from loadtest.publisher import RatePublisher
from loadtest.scenarios.common import StepRun, finish_report, save
from loadtest.servers import RedisServer
from loadtest.storm import ResumeFigures, ResumingWs

MODES = ("cut", "jitter", "deploy", "crash", "redis-restart")
BACK_TIMEOUT = 90.0
# The targets, on this machine.
RECONNECT_P95_MS = 2000.0
REPLAY_P99_MS = 1000.0
MEMORY_SLACK = 1.10  # after the disruption, within 10 % of before it


async def run_storm(
    setup: Setup,
    *,
    clients: int,
    channels: int,
    rate: float,
    duration: float,
    cut_after: float,
    mode: str = "cut",
    jitter_every: float | None = None,
    offline: float = 2.0,
    redis_down: float = 2.0,
    restart_pause: float = 5.0,
    settle: float = 1.0,
) -> dict[str, Any]:
    if jitter_every is None:
        jitter_every = 15.0 if mode in ("jitter", "redis-restart") else 0.0
    config = {
        "mode": mode,
        "clients": clients,
        "channels": channels,
        "rate": rate,
        "duration_s": duration,
        "cut_after_s": cut_after,
        "gateways": setup.gateways,
        "jitter_every_s": jitter_every or None,
        "offline_s": offline if jitter_every else None,
        "redis_down_s": redis_down if mode == "redis-restart" else None,
        "restart_pause_s": restart_pause if mode in ("deploy", "crash") else None,
        "history_size": setup.history_size,
        "pad_bytes": setup.pad_bytes,
        "p99_limit_ms": setup.p99_limit_ms,
    }
    if mode not in MODES:
        raise SystemExit(f"storm --mode: one of {', '.join(MODES)}")
    if setup.transport != "ws":
        raise SystemExit("storm resumes WebSocket clients (--transport ws)")
    if mode in ("deploy", "crash") and setup.gateways < 2:
        raise SystemExit(f"storm --mode {mode} needs --gateways 2 or more (their clients move)")
    if mode == "redis-restart" and (setup.redis_url or setup.url):
        raise SystemExit("storm --mode redis-restart restarts a redis-server it starts itself")
    async with Harness(setup, "storm") as h:
        if h.target.name != "gateway":
            raise SystemExit("storm resumes from offsets: the gateway only")
        if mode == "redis-restart" and h.redis is None:
            raise SystemExit("storm --mode redis-restart needs --broker redis")
        h.dialect = ResumingWs(setup.history_size)
        names = [h.channel(i) for i in range(channels)]
        specs = h.specs([names[i % channels] for i in range(clients)], slow_share=0)
        h.sample()
        empty = memory_now(h)  # no client yet
        connect = await h.connect(specs, n_steps=1)
        watch_children(h)
        subscribed = connect["ready"]
        pool = h.pool
        assert pool is not None
        pool.send(("keep", jitter_every, offline))
        await asyncio.sleep(settle)
        h.sample()
        idle = memory_now(h)
        events: list[dict[str, Any]] = []

        def event(what: str) -> None:
            events.append({"t": round(time.time() - h.t0, 3), "what": what})
            h.progress.note(f"{time.time() - h.t0:6.1f} s  {what}")

        rp = RatePublisher(h.publisher(), names, setup.pad_bytes)
        started = time.time()
        calm = asyncio.Event()
        timing: dict[str, float | None] = {}

        async def disruption_then_back() -> None:
            await disrupt(h, mode, started + cut_after, event, down=redis_down, pause=restart_pause)
            if jitter_every:
                await calm.wait()
            timing["disrupted_until"] = time.time()
            timing["back_after"] = back = await wait_back(h, subscribed, BACK_TIMEOUT)
            event("every client back" if back is not None else "not every client back")

        h.status = status_line(h, mode, started, duration, subscribed)
        disruption = asyncio.create_task(disruption_then_back())
        try:
            publish = await rp.run_step(0, rate, duration)
            publish_end = time.time()
            pool.send(("calm",))
            calm.set()
            if jitter_every:
                event("no more random cuts")
            await asyncio.wait_for(asyncio.shield(disruption), 2 * BACK_TIMEOUT)
            published = rp.published_in(0)
            drained = await h.drain(0, published, setup.drain_timeout)
            run = StepRun(0, rate, (started, publish_end, time.time()), publish, published, drained)
        finally:
            if not disruption.done():
                disruption.cancel()
            await rp.publisher.close()
        await asyncio.sleep(settle * 2)  # the reconnects' garbage collected, buffers shrunk
        h.sample()
        after = memory_now(h)
        end = time.time()
        report, merged = await finish_report(h, "storm", config, clients, connect, [run], rp)
        figures = ResumeFigures()
        for state in merged.resume_states:
            figures.merge_state(state)
        storm = storm_entry(figures, merged.resume_states, report, pool.cut)
        storm["all_back_s_after_disruption"] = timing["back_after"]
        storm["disruption_s"] = round((timing["disrupted_until"] or started) - started, 2)
        storm["workers"] = worker_figures(h, started, end)
        storm["memory_mib"] = memory_entry(idle, after)
        await asyncio.sleep(settle * 2)  # the clients closed by finish_report are gone
        h.sample()
        storm["memory_mib"]["without_clients"] = {
            "before": empty,
            "after": memory_now(h),
            "before_total": round(sum(empty.values()), 1),
            "after_total": round(sum(memory_now(h).values()), 1),
        }
        storm["targets"] = targets(report, storm)
        report["storm"] = storm
        report["events"] = events
        h.notes.append(
            "a replayed publication's latency includes the time its client was away: the "
            "step's p99 is not one of this scenario's targets (storm.targets)"
        )
        if report["publisher"]["errors"]:
            h.notes.append(
                f"publishes refused while {mode} went on (retried with the same seq): "
                f"{sum(report['publisher']['errors'].values())}"
            )
        return save(h, f"storm-{mode}", report)


async def disrupt(
    h: Harness,
    mode: str,
    at: float,
    event: Callable[[str], None],
    *,
    down: float,
    pause: float,
) -> None:
    """What ``mode`` does to the clients, their gateways or Redis, from wall time ``at``."""
    pool = h.pool
    assert pool is not None
    if mode == "jitter":
        event("random cuts from the start")
        return
    await asyncio.sleep(max(0.0, at - time.time()))
    if mode == "cut":
        pool.send(("cut", time.time()))
        event("every connection reset")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(pool.cut_finished.wait(), 30)
        return
    if mode == "redis-restart":
        await restart_redis(h, down, event)
        return
    fleet = h.fleet
    assert fleet is not None
    if mode == "crash":
        event("SIGKILL gateway-0")
        await fleet.kill(0)
        await asyncio.sleep(pause)
        event("starting gateway-0 again")
        await fleet.start(0)
        h.watch_gateway(0)
        event("gateway-0 ready")
        return
    for i in range(len(fleet.ports)):  # deploy: a rolling restart
        if i:
            await asyncio.sleep(pause)
        event(f"SIGTERM gateway-{i}")
        await fleet.stop(i)
        event(f"gateway-{i} exited; starting it again")
        await fleet.start(i)
        h.watch_gateway(i)
        event(f"gateway-{i} ready")


async def restart_redis(h: Harness, down: float, event: Callable[[str], None]) -> None:
    """Stop the redis-server (nothing saved) and start an empty one on the same port."""
    old = h.redis
    assert old is not None
    event("stopping redis-server")
    await asyncio.get_running_loop().run_in_executor(None, old.stop)
    event("redis-server stopped")
    await asyncio.sleep(down)
    h.redis = RedisServer(cpus=h.loadgen_cpus, port=old.port).start()
    await h.redis.wait_ready()
    h.loadgen_samplers["redis-server (again)"] = ProcessSampler(h.redis.pid)
    event("redis-server started again, empty")


async def wait_back(h: Harness, subscribed: int, timeout: float) -> float | None:
    """Seconds until every client that first subscribed is subscribed again (None: not
    all within ``timeout``)."""
    assert h.pool is not None
    pool = h.pool
    began = time.monotonic()
    seen = list(pool.progress_received)  # counts from progress sent after this point
    while (
        any(now < then + 2 for now, then in zip(pool.progress_received, seen, strict=True))
        or pool.totals()["ready"] < subscribed
    ):
        if time.monotonic() - began > timeout:
            return None
        await asyncio.sleep(0.1)
    return round(time.monotonic() - began, 2)


def status_line(
    h: Harness, mode: str, started: float, duration: float, subscribed: int
) -> Callable[[], tuple[str, float | None, str]]:
    def status() -> tuple[str, float | None, str]:
        assert h.pool is not None
        totals = h.pool.totals()
        elapsed = time.time() - started
        up = ""
        if h.fleet is not None:
            up = f", gateways up {sum(h.fleet.running())}/{len(h.fleet.ports)}"
        return (
            f"storm {mode} {'publishing' if elapsed <= duration else 'settling'}",
            min(1.0, elapsed / duration),
            f"{totals['ready']:,}/{subscribed:,} subscribed, {totals['received']:,} received, "
            f"client lag {totals['lag_ms']:.0f} ms{up}",
        )

    return status


def watch_children(h: Harness) -> None:
    """One server with ``GATEWAY_WORKERS=N``: sample each worker process on its own."""
    if h.fleet is not None or h.server_sampler is None:
        return
    pid = h.server_sampler.pid
    with contextlib.suppress(OSError, ValueError):
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        # The workers, not multiprocessing's resource tracker.
        workers = [c for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]
        for k, child in enumerate(workers):
            h.fleet_samplers[f"gateway-worker-{k}"] = ProcessSampler(int(child))


def gateway_samplers(h: Harness) -> dict[str, ProcessSampler]:
    if h.fleet_samplers:
        return h.fleet_samplers
    return {"gateway": h.server_sampler} if h.server_sampler is not None else {}


def memory_now(h: Harness) -> dict[str, float]:
    """RSS (MiB) of every gateway process running now, by the name of its slot."""
    found: dict[str, float] = {}
    for name, sampler in gateway_samplers(h).items():
        latest = sampler.latest()
        if latest is not None and latest.at >= time.time() - 2 and not _dead(sampler):
            found[name.split("#")[0]] = round(latest.rss_kib / 1024, 1)
    return found


def _dead(sampler: ProcessSampler) -> bool:
    from loadtest.procstat import alive

    return not alive(sampler.pid)


def worker_figures(h: Harness, start: float, end: float) -> dict[str, dict[str, Any]]:
    """Per gateway process: peak RSS, mean CPU over the run and its busiest second."""
    figures: dict[str, dict[str, Any]] = {}
    for name, sampler in gateway_samplers(h).items():
        samples = sampler.around(start, end)
        if not samples:
            continue
        lo, hi = samples[0].at, samples[-1].at
        mean = sampler.utilisation(lo, hi)
        peak = max(
            (sampler.utilisation(t, t + 1.0) or 0.0 for t in frange(lo, hi - 1.0, 0.5)),
            default=mean or 0.0,
        )
        figures[name] = {
            "pid": sampler.pid,
            "rss_mib_peak": round(max(s.rss_kib for s in samples) / 1024, 1),
            "cpu_percent_mean": round(mean, 1) if mean is not None else None,
            "cpu_percent_peak_1s": round(peak, 1),
            "sampled_s": round(hi - lo, 1),
            # (seconds since the start, RSS MiB) every 2 s: a leak climbs, a high-water mark
            # levels off.
            "rss_mib_timeline": [
                [round(x.at - h.t0, 1), round(x.rss_kib / 1024, 1)] for x in samples[::4]
            ],
        }
    return figures


def frange(start: float, stop: float, step: float) -> list[float]:
    return [start + i * step for i in range(max(0, int((stop - start) / step) + 1))]


def memory_entry(idle: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    idle_total, after_total = round(sum(idle.values()), 1), round(sum(after.values()), 1)
    return {
        "idle": idle,
        "after": after,
        "idle_total": idle_total,
        "after_total": after_total,
        "back_to_idle": bool(idle_total) and after_total <= idle_total * MEMORY_SLACK,
    }


def storm_entry(
    figures: ResumeFigures, states: list[dict[str, Any]], report: dict[str, Any], cut: int
) -> dict[str, Any]:
    gaps = dict(figures.gaps)
    return {
        "clients": sum(s.get("clients", 0) for s in states),
        "clients_back": sum(s.get("connected_at_end", 0) for s in states),
        "clients_reconnected": sum(s.get("reconnected", 0) for s in states),
        "connections_cut_at_once": cut,
        "reconnects": figures.back.total,
        "reconnect_ms": figures.back.summary_ms(),
        "outage_ms": figures.outage.summary_ms(),
        "replay_ms": figures.replay.summary_ms(),
        "recovered": dict(figures.recovered),
        "gaps_announced": {
            "total": sum(figures.announced.values()),
            "by_reason": dict(figures.announced),
            "judged": gaps,
            "missed_by_kind": dict(figures.gap_missed),
        },
        "disconnects_by_cause": dict(figures.causes),
        "failed_attempts": dict(figures.failures),
        "subscribe_errors": dict(figures.refusals),
        "closes_seen_by_recorder": report["connections"]["closed_by_server"],
        "gave_up": figures.gave_up,
    }


def targets(report: dict[str, Any], storm: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets: met, or by how much they were missed."""
    d = report["deliveries"]
    needless = storm["gaps_announced"]["missed_by_kind"].get("needless", 0)
    held = d["expected"] - d["announced_gaps_missed"] + needless  # what history still held
    reconnect_p95 = storm["reconnect_ms"]["p95"] if storm["reconnects"] else 0.0
    replay_p99 = storm["replay_ms"]["p99"] if storm["replay_ms"]["count"] else 0.0
    checks = {
        "delivered_of_history_held": [d["delivered"], held, d["delivered"] >= held],
        "duplicates": [d["duplicated"], 0, d["duplicated"] == 0],
        "reordered": [d["reordered"], 0, d["reordered"] == 0],
        "unannounced_gaps": [d["lost"] + needless, 0, d["lost"] + needless == 0],
        "clients_back": [
            storm["clients_back"],
            storm["clients"],
            storm["clients_back"] >= storm["clients"],
        ],
        "reconnect_p95_ms": [reconnect_p95, RECONNECT_P95_MS, reconnect_p95 <= RECONNECT_P95_MS],
        "replay_p99_ms": [replay_p99, REPLAY_P99_MS, replay_p99 <= REPLAY_P99_MS],
        "memory_after_vs_idle_mib": [
            storm["memory_mib"]["after_total"],
            storm["memory_mib"]["idle_total"],
            storm["memory_mib"]["back_to_idle"],
        ],
    }
    missed = {name: [got, want] for name, (got, want, ok) in checks.items() if not ok}
    return {
        "checks": {
            name: {"got": got, "want": want, "ok": ok} for name, (got, want, ok) in checks.items()
        },
        "all_met": not missed,
        "missed": missed,
    }
