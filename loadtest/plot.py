"""PNG of a run: latency (p50/p99/max) and deliveries per second over time, steps shaded.

Needs matplotlib (the ``loadtest`` extra); without it the run still writes its JSON.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_report(report: dict[str, Any], path: Path) -> bool:
    """Write the plot; False when matplotlib is missing or there is nothing to draw."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = report.get("timeseries") or []
    if not rows:
        return False
    t = [r["t"] for r in rows]
    fig, (lat_ax, rate_ax) = plt.subplots(
        2, 1, figsize=(11, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 2]}
    )
    lat_ax.plot(t, [r["p50_ms"] for r in rows], label="p50", color="tab:blue")
    lat_ax.plot(t, [r["p99_ms"] for r in rows], label="p99", color="tab:orange")
    lat_ax.plot(t, [r["max_ms"] for r in rows], label="max", color="tab:red", alpha=0.4)
    lag = [r.get("client_lag_ms", 0) for r in rows]
    if any(lag):
        lat_ax.plot(t, lag, label="client loop lag", color="grey", linestyle=":")
    limit = report.get("config", {}).get("p99_limit_ms")
    if limit:
        lat_ax.axhline(limit, color="tab:orange", linestyle="--", linewidth=0.8)
    lat_ax.set_yscale("symlog", linthresh=1.0)
    lat_ax.set_ylabel("latency (ms)")
    lat_ax.legend(loc="upper left", fontsize="small")
    lat_ax.grid(True, which="both", alpha=0.3)

    rate_ax.plot(t, [r["deliveries"] for r in rows], color="tab:green", label="deliveries/s")
    rate_ax.set_ylabel("deliveries/s")
    rate_ax.set_xlabel("seconds since start")
    rate_ax.grid(True, alpha=0.3)
    if any(r.get("server_cpu_percent") is not None for r in rows):
        cpu_ax = rate_ax.twinx()
        cpu_ax.plot(
            t,
            [r.get("server_cpu_percent") for r in rows],
            color="tab:purple",
            alpha=0.6,
            label="server CPU %",
        )
        cpu_ax.set_ylabel("server CPU %")
        top = max((r.get("server_cpu_percent") or 0 for r in rows), default=0)
        cpu_ax.set_ylim(0, max(110, top * 1.1))
    for step in report.get("steps", []):
        start, end, _ = step["window"]
        shade = "tab:green" if step["ok"] else "tab:red"
        for ax in (lat_ax, rate_ax):
            ax.axvspan(start, end, color=shade, alpha=0.06)
        lat_ax.annotate(
            f"{step['rate']:g}/s",
            (start, 1),
            xycoords=("data", "axes fraction"),
            va="top",
            fontsize="x-small",
        )
    for event in report.get("events", []):  # storm: cuts, restarts, crashes
        for ax in (lat_ax, rate_ax):
            ax.axvline(event["t"], color="black", linestyle="--", linewidth=0.7, alpha=0.6)
        lat_ax.annotate(
            event["what"],
            (event["t"], 0.95),
            xycoords=("data", "axes fraction"),
            rotation=90,
            va="top",
            ha="right",
            fontsize="xx-small",
        )
    target = report["target"]
    mode = report.get("config", {}).get("mode")
    fig.suptitle(
        f"{report['scenario']}{' ' + mode if mode else ''}: {target['name']} "
        f"{target['transport']} (publish via {target['publish_via']})"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_hooks(report: dict[str, Any], path: Path) -> bool:
    """``hooks``: per part and variant, the rate of each round, and the mean latency of
    each round split into the hook's own duration (as the gateway saw it) and the rest."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    parts = [
        (name, rate_key, [r for r in report.get(name, []) if "skipped" not in r])
        for name, rate_key in (("connects", "connects_per_s"), ("publishes", "publishes_per_s"))
    ]
    parts = [p for p in parts if p[2]]
    if not parts:
        return False
    fig, axes = plt.subplots(len(parts), 2, figsize=(11, 3.6 * len(parts)), squeeze=False)
    for row, (name, rate_key, runs) in enumerate(parts):
        labels = [f"{r['variant']}\n#{r['round'] + 1}" for r in runs]
        x = list(range(len(runs)))
        rate_ax, lat_ax = axes[row]
        rate_ax.bar(x, [r[rate_key] or 0 for r in runs], color="tab:green")
        rate_ax.set_yscale("log")
        rate_ax.set_ylim(bottom=max(1.0, min(r[rate_key] or 1.0 for r in runs) / 2))
        rate_ax.set_ylabel(f"{name}/s (log)")
        rate_ax.set_title(f"{name}: rate per run", fontsize="medium")
        hook = [(r["hook"]["mean_ms"] or 0.0) for r in runs]
        # Under saturation the hook's mean (which then includes waiting for the loop) can
        # pass the client's mean: the rest is then drawn as nothing.
        rest = [max(1e-3, r["latency_ms"]["mean"] - h) for r, h in zip(runs, hook, strict=True)]
        lat_ax.bar(x, rest, color="tab:blue", label="mean latency less the hook")
        lat_ax.bar(x, hook, bottom=rest, color="tab:orange", label="hook, as the gateway saw it")
        lat_ax.plot(x, [r["latency_ms"]["p99"] for r in runs], "k_", markersize=14, label="p99")
        lat_ax.set_yscale("log")
        lowest = min(min(r["latency_ms"]["p50"], r["latency_ms"]["mean"]) for r in runs)
        lat_ax.set_ylim(bottom=max(1e-3, lowest / 2))
        lat_ax.set_ylabel("ms (log)")
        lat_ax.set_title(f"{name}: latency per run", fontsize="medium")
        lat_ax.legend(loc="upper left", fontsize="x-small")
        for ax in (rate_ax, lat_ax):
            ax.set_xticks(x, labels, fontsize="x-small")
            ax.grid(True, axis="y", alpha=0.3)
    target = report["target"]
    fig.suptitle(
        f"hooks: gateway {target['transport']} connects, ws publishes, {target['broker']} broker"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
