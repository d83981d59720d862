"""``python -m loadtest.tracing <gateway args>``: the gateway with timestamps along the way
a publication takes through the worker, for ``fanout --trace`` (the latency breakdown).

Before the app exists it wraps

* ``Fanout._on_message``: when the worker read each publication from the broker,
* ``Fanout._flush``: when the fan-out pass that wrote it started and ended, and to how
  many sessions,

and records what holds the event loop up meanwhile: garbage collections
(``gc.callbacks``), the keep-alive ticks and timer runs that took over a millisecond, and
the loop's lag (how late a 10 ms timer fires). ``SIGUSR1`` writes what was recorded to
the file named by ``LOADTEST_TRACE`` (JSON) and starts afresh.

The wrapping costs a few microseconds per pass and per publication read, and the lag
timer about a hundred wake-ups a second: a traced run is for where the time goes, not for
the headline figures.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

LAG_TICK = 0.010  # seconds between two lag probes
LAG_RECORDED = 0.002  # lateness worth a record, seconds
SLOW_CALL = 0.001  # keep-alive ticks and timer runs longer than this are recorded


class Recorder:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.reset()
        self._gc_started = 0.0
        self._lag_running = False

    def reset(self) -> None:
        # (channel, offset) -> [published_at, read_at, pass_start, pass_end, sessions]
        self.publications: dict[tuple[str, int], list[float]] = {}
        self.gc: list[tuple[float, float, int]] = []  # (start, seconds, generation)
        self.lag: list[tuple[float, float]] = []  # (when, seconds late)
        self.slow_calls: list[tuple[float, float, str]] = []  # (start, seconds, what)
        self.lag_probes = 0

    def dump(self) -> None:
        body = {
            "pid": os.getpid(),
            "written_at": time.time(),
            "publications": [[c, o, *v] for (c, o), v in self.publications.items()],
            "gc": self.gc,
            "lag": self.lag,
            "lag_probes": self.lag_probes,
            "lag_tick_s": LAG_TICK,
            "slow_calls": self.slow_calls,
        }
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(orjson.dumps(body))
        tmp.replace(self.path)
        self.reset()

    # -- what holds the loop up --------------------------------------------------------

    def on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            seconds = time.perf_counter() - self._gc_started
            self.gc.append((time.time() - seconds, seconds, info["generation"]))

    def start_lag_probe(self) -> None:
        if self._lag_running:
            return
        self._lag_running = True
        loop = asyncio.get_running_loop()
        expected = time.perf_counter() + LAG_TICK

        def probe() -> None:
            nonlocal expected
            now = time.perf_counter()
            late = now - expected
            self.lag_probes += 1
            if late > LAG_RECORDED:
                self.lag.append((time.time() - late, late))
            expected = now + LAG_TICK
            loop.call_later(LAG_TICK, probe)

        loop.call_later(LAG_TICK, probe)

    def timed(self, what: str, call: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any) -> Any:
            started = time.perf_counter()
            try:
                return call(*args)
            finally:
                seconds = time.perf_counter() - started
                if seconds > SLOW_CALL:
                    self.slow_calls.append((time.time() - seconds, seconds, what))

        return wrapper


def install(recorder: Recorder) -> None:
    from channels.fanout import Fanout
    from channels.publication import Publication
    from gateway import timers
    from gateway.server import keepalive

    on_message = Fanout._on_message
    flush = Fanout._flush
    publications = recorder.publications

    def traced_on_message(self: Fanout, message: Any) -> None:
        if isinstance(message, Publication):
            key = (message.channel, message.offset)
            if key not in publications:
                publications[key] = [message.published_at, time.time(), 0.0, 0.0, 0]
        recorder.start_lag_probe()
        on_message(self, message)

    def traced_flush(self: Fanout, lc: Any) -> None:
        pending = lc.pending
        sessions = len(lc.live)
        started = time.time()
        flush(self, lc)
        ended = time.time()
        for message in pending or ():
            record = publications.get(
                (getattr(message, "channel", ""), getattr(message, "offset", 0))
            )
            if record is not None and not record[2]:
                record[2], record[3], record[4] = started, ended, sessions

    Fanout._on_message = traced_on_message  # type: ignore[method-assign]
    Fanout._flush = traced_flush  # type: ignore[method-assign]
    keepalive.Keepalive._tick = recorder.timed("keepalive tick", keepalive.Keepalive._tick)  # type: ignore[method-assign]
    timers.Timers._run = recorder.timed("timers run", timers.Timers._run)  # type: ignore[method-assign]
    gc.callbacks.append(recorder.on_gc)
    signal.signal(signal.SIGUSR1, lambda *_: recorder.dump())


def main() -> int:
    path = os.environ.get("LOADTEST_TRACE")
    if not path:
        sys.stderr.write("loadtest.tracing: set LOADTEST_TRACE to the file to write\n")
        return 2
    install(Recorder(Path(path)))
    from gateway.__main__ import main as gateway_main

    return gateway_main(sys.argv[1:])


# -- the breakdown, from a trace and the fan-out report ----------------------------------


def forget_trace(path: Path) -> None:
    path.unlink(missing_ok=True)


def read_trace(path: Path) -> dict[str, Any] | None:
    """The trace the gateway wrote (it replaces the file whole), or None yet."""
    try:
        trace: dict[str, Any] = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    return trace


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def _ms(values: list[float]) -> dict[str, float]:
    return {
        "p50": round(_pct(values, 0.50) * 1000, 2),
        "p99": round(_pct(values, 0.99) * 1000, 2),
        "max": round(max(values) * 1000, 2) if values else float("nan"),
        "mean": round(statistics.fmean(values) * 1000, 2) if values else float("nan"),
    }


def breakdown(trace: dict[str, Any], report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per step of ``report``: where a publication's time went, from the trace."""
    started_at = report["started_at"]
    rows = []
    for step in report["steps"]:
        begin, publish_end, end = (started_at + w for w in step["window"])
        pubs = [p for p in trace["publications"] if begin <= p[2] <= publish_end and p[4] and p[5]]
        if not pubs:
            continue
        to_read = [p[3] - p[2] for p in pubs]
        to_pass = [p[4] - p[3] for p in pubs]
        passes = [p[5] - p[4] for p in pubs]
        to_pass_end = [p[5] - p[2] for p in pubs]
        sessions = statistics.median(p[6] for p in pubs)
        gcs = [g for g in trace["gc"] if begin <= g[0] <= end]
        lags = [lag for lag in trace["lag"] if begin <= lag[0] <= end]
        slow = [s for s in trace["slow_calls"] if begin <= s[0] <= end]
        latency = step["latency_ms"]
        inside_p50 = (
            _pct(to_read, 0.5) + _pct(to_pass, 0.5) + _pct(passes, 0.5) / 2
        ) * 1000  # the median subscriber is written half way through the pass
        rows.append(
            {
                "step": step["step"],
                "rate": step["rate"],
                "publications": len(pubs),
                "sessions": sessions,
                "publish_to_read_ms": _ms(to_read),
                "read_to_pass_ms": _ms(to_pass),
                "pass_ms": _ms(passes),
                "us_per_write": round(statistics.median(passes) / max(1, sessions) * 1e6, 2),
                "publish_to_pass_end_ms": _ms(to_pass_end),
                "client_ms": {k: latency[k] for k in ("p50", "p99", "max")},
                "client_p50_less_inside_ms": round(latency["p50"] - inside_p50, 2),
                "gc": {
                    "count": len(gcs),
                    "total_ms": round(sum(g[1] for g in gcs) * 1000, 2),
                    "max_ms": round(max((g[1] for g in gcs), default=0) * 1000, 2),
                    "gen2": sum(1 for g in gcs if g[2] == 2),
                },
                "loop_lag": {
                    "over_2ms": len(lags),
                    "over_10ms": sum(1 for lag in lags if lag[1] > 0.010),
                    "max_ms": round(max((lag[1] for lag in lags), default=0) * 1000, 2),
                },
                "slow_calls": {
                    what: {
                        "count": sum(1 for s in slow if s[2] == what),
                        "max_ms": round(max(s[1] for s in slow if s[2] == what) * 1000, 2),
                    }
                    for what in sorted({s[2] for s in slow})
                },
            }
        )
    return rows


def breakdown_lines(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    for r in rows:
        lines.append(
            f"step {r['step'] + 1} ({r['rate']:g}/s, {r['sessions']:,.0f} sessions): "
            f"publish→read p50 {r['publish_to_read_ms']['p50']} / p99 "
            f"{r['publish_to_read_ms']['p99']} ms; read→pass {r['read_to_pass_ms']['p50']} / "
            f"{r['read_to_pass_ms']['p99']} ms; pass {r['pass_ms']['p50']} / "
            f"{r['pass_ms']['p99']} ms ({r['us_per_write']} µs a write); client "
            f"{r['client_ms']['p50']} / {r['client_ms']['p99']} ms; GC {r['gc']['count']} "
            f"(max {r['gc']['max_ms']} ms); loop lag >10 ms {r['loop_lag']['over_10ms']} "
            f"(max {r['loop_lag']['max_ms']} ms)"
        )
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
