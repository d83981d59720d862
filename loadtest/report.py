"""The JSON report: merging the workers' figures, per-step results, and a text summary.

Loss is counted per step: every publication of step ``k`` should reach every normal
subscriber of its channel that is still open at the end, so
``lost = sum(published[ch][k] * open_subscribers[ch]) - announced - unique deliveries``,
where ``announced`` counts the publications subscribers skipped across a gap the server
announced (``recovered: false``, a new epoch): history no longer had them.

The load generator is declared the bottleneck of a step when one of its processes used
more than ``BUSY_PERCENT`` of a core, or a worker's event loop lagged more than
``LAG_LIMIT_MS``: its own delays then show up as latency and the server was not the
limit.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from loadtest.histogram import Histogram
from loadtest.procstat import machine_info

BUSY_PERCENT = 85.0
LAG_LIMIT_MS = 100.0
# A CPU this busy while our own processes on it use far less: someone else competes.
CONTENDED_PERCENT = 90.0
FOREIGN_PERCENT = 25.0
SCHEMA = 1


@dataclass
class Merged:
    step_hists: list[Histogram] = field(default_factory=list)
    arrival_hists: list[Histogram] = field(default_factory=list)  # kernel receive times
    second_hists: dict[int, Histogram] = field(default_factory=dict)
    unique: Counter[tuple[str, int]] = field(default_factory=Counter)
    announced_by_step: list[int] = field(default_factory=list)
    unannounced_missing: int = 0
    resume_states: list[dict[str, Any]] = field(default_factory=list)  # keepers' figures
    clients_with_unannounced_missing: int = 0
    alive: Counter[str] = field(default_factory=Counter)
    closes: Counter[str] = field(default_factory=Counter)
    connect_hist: Histogram = field(default_factory=Histogram)
    connect_failures: Counter[str] = field(default_factory=Counter)
    churn_hist: Histogram = field(default_factory=Histogram)
    churn_failures: Counter[str] = field(default_factory=Counter)
    churn_ok: int = 0
    lag_by_second: dict[int, float] = field(default_factory=dict)
    received: int = 0
    duplicates: int = 0
    reordered: int = 0
    slow_received: int = 0
    foreign: int = 0
    slow_conns: int = 0
    slow_ready: int = 0

    @classmethod
    def of(cls, finals: list[dict[str, Any]]) -> Merged:
        m = cls()
        for f in finals:
            for hists, states in (
                (m.step_hists, f["step_hists"]),
                (m.arrival_hists, f.get("arrival_hists", [])),
            ):
                for k, state in enumerate(states):
                    while len(hists) <= k:
                        hists.append(Histogram())
                    hists[k].merge(Histogram.from_state(state))
            for second, state in f["second_hists"].items():
                m.second_hists.setdefault(second, Histogram()).merge(Histogram.from_state(state))
            m.unique.update(f["unique"])
            for k, n in enumerate(f.get("announced_by_step", [])):
                while len(m.announced_by_step) <= k:
                    m.announced_by_step.append(0)
                m.announced_by_step[k] += n
            m.unannounced_missing += f.get("unannounced_missing", 0)
            if "resume" in f:
                m.resume_states.append(f["resume"])
            m.clients_with_unannounced_missing += f.get("clients_with_unannounced_missing", 0)
            m.alive.update(f["alive_by_channel"])
            m.closes.update(f["closes"])
            m.connect_hist.merge(Histogram.from_state(f["connect_hist"]))
            m.connect_failures.update(f["connect_failures"])
            m.churn_hist.merge(Histogram.from_state(f["churn_hist"]))
            m.churn_failures.update(f["churn_failures"])
            m.churn_ok += f["churn_ok"]
            for second, lag in f.get("lag_by_second", {}).items():
                m.lag_by_second[second] = max(lag, m.lag_by_second.get(second, 0.0))
            for key in (
                "received",
                "duplicates",
                "reordered",
                "slow_received",
                "foreign",
                "slow_conns",
                "slow_ready",
            ):
                setattr(m, key, getattr(m, key) + f[key])
        return m

    def delivered(self, step: int) -> int:
        return sum(n for (_, k), n in self.unique.items() if k == step)

    def announced(self, step: int) -> int:
        return self.announced_by_step[step] if step < len(self.announced_by_step) else 0

    def expected(self, step: int, published: dict[str, int]) -> int:
        return sum(n * self.alive.get(ch, 0) for ch, n in published.items())

    def lag_ms(self, t0: float, start: float, end: float) -> float:
        seconds = range(int(start - t0), int(end - t0) + 1)
        return round(1000 * max((self.lag_by_second.get(s, 0.0) for s in seconds), default=0.0), 1)

    @property
    def slow_closes(self) -> int:
        return sum(n for key, n in self.closes.items() if key.startswith("slow:"))

    @property
    def normal_closes(self) -> int:
        return sum(n for key, n in self.closes.items() if key.startswith("normal:"))


def server_figures(harness: Any, start: float, end: float) -> dict[str, Any]:
    """CPU and peak RSS of the server, every gateway process of a fleet added up."""
    samplers = [harness.server_sampler] if harness.server_sampler is not None else []
    samplers += list(getattr(harness, "fleet_samplers", {}).values())
    if not samplers:
        return {}
    cpus = [c for c in (s.utilisation(start, end) for s in samplers) if c is not None]
    peaks = [r for r in (s.rss_max_kib(start, end) for s in samplers) if r is not None]
    cpu = sum(cpus) if cpus else None
    rss = sum(peaks) if peaks else None
    return {
        "cpu_percent": round(cpu, 1) if cpu is not None else None,
        "rss_mib_max": round(rss / 1024, 1) if rss is not None else None,
    }


def loadgen_figures(harness: Any, merged: Merged, start: float, end: float) -> dict[str, Any]:
    """Our own processes' CPU in the window, worst event-loop lag, and the verdict."""
    cpu: dict[str, float] = {}
    for name, sampler in harness.loadgen_samplers.items():
        value = sampler.utilisation(start, end)
        if value is not None:
            cpu[name] = round(value, 1)
    lag = merged.lag_ms(harness.t0, start, end)
    reasons = [f"{name} at {value:.0f}% CPU" for name, value in cpu.items() if value > BUSY_PERCENT]
    if lag > LAG_LIMIT_MS:
        reasons.append(f"client event loop lagged {lag:.0f} ms")
    machine = harness.machine.busy(start, end)
    return {
        "cpu_percent": cpu,
        "cpu_percent_total": round(sum(cpu.values()), 1),
        "cpus": harness.loadgen_cpus,
        "loop_lag_ms_max": lag,
        "machine_cpu_busy_percent": machine,
        "bottleneck": bool(reasons),
        "bottleneck_reasons": reasons,
    }


def contention(harness: Any, start: float, end: float, ours: dict[str, float]) -> list[str]:
    """CPUs that other processes kept busy during the window (shared machines)."""
    machine = harness.machine.busy(start, end)
    found = []
    server_cpu = server_figures(harness, start, end).get("cpu_percent") or 0.0
    groups = [
        ("server", harness.server_cpus or [], server_cpu),
        ("load generator", harness.loadgen_cpus or [], sum(ours.values())),
    ]
    for label, cpus, used in groups:
        busy = [machine[c] for c in cpus if c in machine]
        if not busy:
            continue
        capacity = 100.0 * len(busy)
        total = sum(busy)
        if total >= CONTENDED_PERCENT * len(busy) and total - used >= FOREIGN_PERCENT:
            found.append(
                f"{label} CPU {','.join(map(str, cpus))} was {total / len(busy):.0f}% busy "
                f"but our {label} used {used:.0f}% of {capacity:.0f}%: other processes "
                "(or kernel work not charged to ours) competed"
            )
    return found


def step_entry(
    harness: Any,
    merged: Merged,
    k: int,
    window: tuple[float, float, float],
    publish: dict[str, Any],
    published: dict[str, int],
) -> dict[str, Any]:
    start, publish_end, end = window
    hist = merged.step_hists[k] if k < len(merged.step_hists) else Histogram()
    expected = merged.expected(k, published)
    delivered = merged.delivered(k)
    announced = merged.announced(k)
    lost = max(0, expected - announced - delivered)
    latency = hist.summary_ms()
    limit = harness.setup.p99_limit_ms
    rate_ok = publish["achieved_rate"] >= 0.95 * publish["target_rate"]
    failures = []
    if not expected:
        failures.append("no subscriber to deliver to")
    if lost:
        failures.append(f"{lost} lost")
    if latency["p99"] >= limit:
        failures.append(f"p99 {latency['p99']:.0f} ms >= {limit:.0f} ms")
    if not rate_ok:
        failures.append(
            f"published {publish['achieved_rate']:.1f}/s of {publish['target_rate']:g}/s"
        )
    loadgen = loadgen_figures(harness, merged, start, publish_end)
    contended = contention(harness, start, publish_end, loadgen["cpu_percent"])
    nominal = publish["published"] / publish["target_rate"]
    arrival = merged.arrival_hists[k] if k < len(merged.arrival_hists) else None
    extra = {"arrival_latency_ms": arrival.summary_ms()} if arrival and arrival.total else {}
    return {
        "step": k,
        "rate": publish["target_rate"],
        "publish": publish,
        "expected": expected,
        "announced_gaps_missed": announced,
        "delivered": delivered,
        # Over the nominal step (or longer, if publishing fell behind).
        "deliveries_per_s": round(delivered / max(1e-9, publish["elapsed_s"], nominal), 1),
        "lost": lost,
        "latency_ms": latency,
        **extra,
        "server": server_figures(harness, start, publish_end),
        "loadgen": loadgen,
        "window": [
            round(start - harness.t0, 3),
            round(publish_end - harness.t0, 3),
            round(end - harness.t0, 3),
        ],
        "ok": not failures,
        "failures": failures,
        "contention": contended,
    }


def timeseries(harness: Any, merged: Merged) -> list[dict[str, Any]]:
    rows = []
    sampled = harness.server_sampler is not None or bool(getattr(harness, "fleet_samplers", {}))
    for second in sorted(merged.second_hists):
        hist = merged.second_hists[second]
        row: dict[str, Any] = {
            "t": second,
            "deliveries": hist.total,
            "p50_ms": round(hist.percentile_us(0.5) / 1000, 3),
            "p99_ms": round(hist.percentile_us(0.99) / 1000, 3),
            "max_ms": round(hist.max_us / 1000, 3),
            "client_lag_ms": round(1000 * merged.lag_by_second.get(second, 0.0), 1),
        }
        if sampled:
            at = harness.t0 + second
            row["server_cpu_percent"] = server_figures(harness, at, at + 1.01).get("cpu_percent")
        rows.append(row)
    return rows


def base_report(harness: Any, scenario: str, config: dict[str, Any]) -> dict[str, Any]:
    setup = harness.setup
    server: dict[str, Any] = {"url": harness.base_url}
    if harness.server is not None:
        server.update(command=harness.server.command, cpus=harness.server_cpus)
    if harness.server_sampler is not None:
        server["pid"] = harness.server_sampler.pid
    return {
        "schema": SCHEMA,
        "tool": "loadtest",
        "scenario": scenario,
        "started_at": harness.t0,
        "command": setup.command or " ".join(sys.argv),
        "target": {
            "name": harness.target.name,
            "description": harness.target.description,
            "transport": setup.transport,
            "publish_via": harness.publish_via,
            "broker": setup.broker if harness.target.publish == "gateway" else "redis",
        },
        "server": server,
        "machine": machine_info(),
        "config": config,
        "notes": harness.notes,
    }


def connections_entry(merged: Merged, requested: int, connect: dict[str, Any]) -> dict[str, Any]:
    return {
        "requested": requested,
        "subscribed": merged.connect_hist.total,
        "failed": sum(merged.connect_failures.values()),
        "failures": dict(merged.connect_failures),
        "connect_elapsed_s": connect.get("elapsed_s"),
        "connect_latency_ms": merged.connect_hist.summary_ms(),
        "slow": merged.slow_conns,
        "open_at_end": sum(merged.alive.values()),
        "closed_by_server": dict(merged.closes),
        "slow_consumer_closes": merged.slow_closes,
        "normal_closes": merged.normal_closes,
    }


def deliveries_entry(merged: Merged, steps: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "received": merged.received,
        "delivered": sum(s["delivered"] for s in steps),
        "expected": sum(s["expected"] for s in steps),
        "lost": sum(s["lost"] for s in steps),
        "announced_gaps_missed": sum(s["announced_gaps_missed"] for s in steps),
        "unannounced_missing": merged.unannounced_missing,
        "clients_with_unannounced_missing": merged.clients_with_unannounced_missing,
        "duplicated": merged.duplicates,
        "reordered": merged.reordered,
        "slow_consumer_received": merged.slow_received,
        "unrecognised": merged.foreign,
    }


def summary_entry(steps: list[dict[str, Any]], merged: Merged) -> dict[str, Any]:
    passing = [s["rate"] for s in steps if s["ok"] and not merged.duplicates]
    bottleneck = [s["rate"] for s in steps if s["loadgen"]["bottleneck"]]
    return {
        "max_rate_ok": max(passing) if passing else None,
        "steps_ok": sum(1 for s in steps if s["ok"]),
        "steps": len(steps),
        "loadgen_bottleneck": bool(bottleneck),
        "loadgen_bottleneck_at_rates": bottleneck,
    }


def write_report(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))


def summary_text(report: dict[str, Any]) -> str:
    """What a person reads at the end of a run."""
    t = report["target"]
    lines = [
        f"{report['scenario']}: {t['name']} over {t['transport']}, publish via {t['publish_via']}"
    ]
    conns = report.get("connections")
    if conns:
        lines.append(
            f"  connections: {conns['subscribed']:,}/{conns['requested']:,} subscribed, "
            f"{conns['failed']} failed, slow-consumer closes {conns['slow_consumer_closes']}, "
            f"other server closes {conns['normal_closes']}"
        )
    for s in report.get("steps", []):
        lat = s["latency_ms"]
        srv = s.get("server", {})
        flag = "ok " if s["ok"] else "BAD"
        lg = " [load generator bottleneck]" if s["loadgen"]["bottleneck"] else ""
        lines.append(
            f"  {flag} rate {s['rate']:>7g}/s  {s['deliveries_per_s']:>10,.0f} deliveries/s  "
            f"p50 {lat['p50']:7.1f}  p95 {lat['p95']:7.1f}  p99 {lat['p99']:7.1f}  "
            f"max {lat['max']:7.1f} ms  lost {s['lost']}  "
            f"server cpu {srv.get('cpu_percent')}%{lg}"
        )
    summary = report.get("summary", {})
    if report.get("steps"):
        lines.append(
            f"  highest rate with p99 < {report['config'].get('p99_limit_ms')} ms and "
            f"nothing lost: {summary['max_rate_ok']}"
        )
    idle = report.get("idle")
    if idle:
        lines.append(
            f"  idle: {idle['connections']:,} connections, server RSS "
            f"{idle['rss_before_mib']} -> {idle['rss_after_mib']} MiB, "
            f"{idle['per_connection_kib']} KiB per connection"
        )
    churn = report.get("churn")
    if churn:
        lines.append(
            f"  churn: {churn['succeeded']:,}/{churn['attempted']:,} connect+subscribe+close "
            f"({churn['achieved_rate']}/s of {churn['rate']}/s), connect p50 "
            f"{churn['connect_latency_ms']['p50']} ms p99 {churn['connect_latency_ms']['p99']} ms"
        )
    d = report.get("deliveries")
    if d:
        lines.append(
            f"  deliveries: {d['delivered']:,} of {d['expected']:,} expected, lost {d['lost']}, "
            f"duplicated {d['duplicated']}, reordered {d['reordered']}"
        )
    storm = report.get("storm")
    if storm:
        lines.extend(storm_text(report, storm))
    for note in report.get("notes", []):
        lines.append(f"  note: {note}")
    for key in ("json", "plot"):
        if report.get("files", {}).get(key):
            lines.append(f"  {key}: {report['files'][key]}")
    return "\n".join(lines)


def storm_text(report: dict[str, Any], storm: dict[str, Any]) -> list[str]:
    back, out, replay = storm["reconnect_ms"], storm["outage_ms"], storm["replay_ms"]
    gaps = storm["gaps_announced"]
    lines = [
        f"  storm {report['config'].get('mode', 'cut')}: {storm['clients_back']:,}/"
        f"{storm['clients']:,} clients back, {storm['reconnects']:,} reconnects; reconnect "
        f"p50/p95/p99 {back['p50']:.0f}/{back['p95']:.0f}/{back['p99']:.0f} ms (outage p95 "
        f"{out['p95']:.0f} ms), replay p99 {replay['p99']:.1f} ms",
        f"    recovered {storm['recovered']}, gaps announced {gaps['total']} "
        f"{gaps['judged']}, publications skipped across them {gaps['missed_by_kind']}",
        f"    disconnects {storm['disconnects_by_cause']}, failed attempts "
        f"{storm['failed_attempts']}, subscribe errors {storm['subscribe_errors']}",
    ]
    memory = storm.get("memory_mib")
    if memory:
        lines.append(
            f"    gateway RSS {memory['idle_total']} MiB before, {memory['after_total']} MiB after"
        )
    targets = storm.get("targets")
    if targets:
        missed = ", ".join(
            f"{k} {got} (target {want})" for k, (got, want) in targets["missed"].items()
        )
        lines.append(f"    targets: {'all met' if targets['all_met'] else 'missed: ' + missed}")
    return lines
