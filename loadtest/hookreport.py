"""The ``hooks`` scenario's report: the hook's figures from two /metrics readings, the
ranges over the rounds, and the text a person reads at the end of a run."""

from __future__ import annotations

from typing import Any

PARTS = ("connects", "publishes")
CONNECT_VARIANTS = ("none", "connect", "subscribe")
PUBLISH_VARIANTS = ("plain", "hooked")


def delta(before: dict[str, float], after: dict[str, float], key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


def hook_figures(
    hook: str | None, before: dict[str, float], after: dict[str, float]
) -> dict[str, Any]:
    """Calls, outcomes and mean duration of ``hook`` between two /metrics readings."""
    if hook is None:
        counts = [key for key in after if key.startswith("gateway_hook_seconds_count")]
        calls = sum(delta(before, after, key) for key in counts)
        return {"name": None, "calls": int(calls), "mean_ms": None, "outcomes": {}}
    label = f'{{hook="{hook}"}}'
    calls = delta(before, after, f"gateway_hook_seconds_count{label}")
    seconds = delta(before, after, f"gateway_hook_seconds_sum{label}")
    prefix = f'gateway_hook_outcomes_total{{hook="{hook}",outcome="'
    outcomes = {
        key[len(prefix) : -2]: int(delta(before, after, key))
        for key in after
        if key.startswith(prefix) and delta(before, after, key)
    }
    return {
        "name": hook,
        "calls": int(calls),
        "mean_ms": round(seconds / calls * 1000, 3) if calls else None,
        "outcomes": outcomes,
    }


def minus_hook(latency: dict[str, Any], hook: dict[str, Any]) -> dict[str, float] | None:
    """The client's latency less the hook's mean duration (percentiles: approximate)."""
    mean = hook.get("mean_ms")
    if mean is None:
        return None
    return {key: round(latency[key] - mean, 3) for key in ("mean", "p50", "p99")}


def span(values: list[float | None]) -> list[float] | None:
    """[lowest, highest] of the values that exist."""
    present = [v for v in values if v is not None]
    return [min(present), max(present)] if present else None


def summarise(runs: list[dict[str, Any]], baseline: str, rate_key: str, cpu_key: str) -> Any:
    """Per variant, the range over the rounds; and against ``baseline`` of the same round,
    the range of the differences (the A/B figure on a noisy machine)."""
    measured = [r for r in runs if "skipped" not in r]
    by_round = {(r["variant"], r["round"]): r for r in measured}
    summary: dict[str, Any] = {}
    for variant in dict.fromkeys(r["variant"] for r in runs):
        own = [r for r in measured if r["variant"] == variant]
        if not own:
            summary[variant] = {"skipped": next(r["skipped"] for r in runs if "skipped" in r)}
            continue
        entry: dict[str, Any] = {
            "runs": len(own),
            rate_key: span([r[rate_key] for r in own]),
            "latency_p50_ms": span([r["latency_ms"]["p50"] for r in own]),
            "latency_p99_ms": span([r["latency_ms"]["p99"] for r in own]),
            "latency_mean_ms": span([r["latency_ms"]["mean"] for r in own]),
            cpu_key: span([r[cpu_key] for r in own]),
            "hook_mean_ms": span([r["hook"]["mean_ms"] for r in own]),
            "backend_service_us_mean": span(
                [s["mean"] for r in own for s in r["backend"]["service_us"].values()]
            ),
            "latency_mean_minus_hook_ms": span(
                [(r["latency_minus_hook_ms"] or {}).get("mean") for r in own]
            ),
        }
        if variant != baseline:
            pairs = [
                (r, by_round[(baseline, r["round"])])
                for r in own
                if (baseline, r["round"]) in by_round
            ]
            entry["vs_" + baseline] = {
                "extra_server_cpu_us": span([r[cpu_key] - b[cpu_key] for r, b in pairs]),
                "extra_latency_mean_ms": span(
                    [r["latency_ms"]["mean"] - b["latency_ms"]["mean"] for r, b in pairs]
                ),
                "rate_ratio": span([r[rate_key] / b[rate_key] for r, b in pairs if b[rate_key]]),
            }
        summary[variant] = entry
    return summary


def rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 3)
    if isinstance(value, list):
        return [rounded(v) for v in value]
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    return value


def summary(report: dict[str, Any]) -> str:
    """What a person reads at the end of a run."""
    lines = [f"hooks: gateway, one worker, {report['target']['broker']} broker"]
    for run in report["connects"]:
        head = f"  connects {run['variant']:<9} round {run['round'] + 1}"
        if "skipped" in run:
            lines.append(f"{head}: skipped ({run['skipped']})")
            continue
        lat, hook = run["latency_ms"], run["hook"]
        lines.append(
            f"{head}: {run['connects_per_s']:>7,.0f}/s  p50 {lat['p50']:6.2f}  p99 "
            f"{lat['p99']:6.2f} ms  server {run['server_cpu_us_per_connect']:6.0f} µs/connect"
            + (f"  hook {hook['mean_ms']:.3f} ms x {hook['calls']}" if hook["mean_ms"] else "")
            + (f"  failed {run['failed']}" if run["failed"] else "")
        )
    for run in report["publishes"]:
        lat, hook = run["latency_ms"], run["hook"]
        lines.append(
            f"  publishes {run['variant']:<8} round {run['round'] + 1}: "
            f"{run['publishes_per_s']:>7,.0f}/s  p50 {lat['p50']:6.2f}  p99 {lat['p99']:6.2f} ms  "
            f"server {run['server_cpu_us_per_publish']:6.0f} µs/publish"
            + (f"  hook {hook['mean_ms']:.3f} ms x {hook['calls']}" if hook["mean_ms"] else "")
            + (f"  refused {run['refused']}" if run["refused"] else "")
        )
    for note in report["notes"]:
        lines.append(f"  note: {note}")
    for key in ("json", "plot"):
        if report["files"].get(key):
            lines.append(f"  {key}: {report['files'][key]}")
    return "\n".join(lines)
