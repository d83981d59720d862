"""``python -m loadtest compare``: the gateway and the baselines through identical scenarios.

Every server runs alone, one worker pinned to ``--server-cpus`` (one core by default),
and is fed by the same Redis publisher (the gateway through its Redis broker's publish
path, the Python baselines with a plain ``PUBLISH``, Nchan by HTTP POST to its publisher
nginx). The sections:

* ``fanout-ws``: ``--ws-clients`` WebSocket subscribers, stepped ``--ws-rates``, stopping
  at the first failing step; the figure is the highest rate with p99 below the limit and
  nothing lost.
* ``fanout-sse``: the same with ``--sse-clients`` SSE streams.
* ``idle``: ``--idle-clients`` idle subscribed connections: server memory per connection.
* ``light``: every server at light load, each rate a step of ``--light-duration`` s:
  ``--light-clients`` WebSocket subscribers at each of ``--light-ws-rates`` and
  ``--light-sse-clients`` SSE streams at each of ``--light-sse-rates`` (a server that
  speaks only one of them runs only those steps); latency p50/p95/p99/max, lost and server
  CPU per step. The clients read with the kernel's receive times here (``--kernel-stamps``):
  each step's latency when the client process read it and when it arrived in its kernel,
  the second apart from the time one client process takes to read thousands of sockets.

The servers: the gateway, the Python baselines of ``loadtest/baselines`` and Nchan (nginx
with the nchan module, ``nchan_redis_pass``; publications by HTTP POST to a second nginx
on the same Redis, see ``loadtest/nchan.py``; needs the Debian packages
``nginx-light libnginx-mod-nchan``).

Each run's JSON (and PNG) lands in ``--out-dir``; the table goes into ``--doc`` between
the markers of ``loadtest.benchdoc`` (text outside them is kept).
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from loadtest.argtypes import cpus, floats
from loadtest.benchdoc import render_section, write_section
from loadtest.config import Setup
from loadtest.procstat import machine_info, wait_for_quiet
from loadtest.scenarios import run_fanout, run_idle
from loadtest.targets import TARGETS

SECTIONS = ("fanout-ws", "fanout-sse", "idle", "light")
DEFAULT_RATES = "1,2,5,10,15,20,30,40,50,75,100,150,200,300"


def add_compare_parser(sub: Any) -> None:
    p = sub.add_parser(
        "compare",
        help="run the gateway and the baselines through identical scenarios",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated subset of {', '.join(SECTIONS)}, or none (with --reuse: "
        "only rewrite the document from earlier reports)",
    )
    p.add_argument(
        "--targets",
        default=",".join(TARGETS),
        help=f"comma-separated subset of the servers: {', '.join(TARGETS)} (default all)",
    )
    p.add_argument(
        "--ws-clients", type=int, default=5000, help="WebSocket subscribers of fanout-ws"
    )
    p.add_argument(
        "--ws-rates",
        type=floats,
        default=floats(DEFAULT_RATES),
        help=f"publications/s of the fanout-ws steps (default {DEFAULT_RATES})",
    )
    p.add_argument("--sse-clients", type=int, default=2000, help="SSE subscribers of fanout-sse")
    p.add_argument(
        "--sse-rates",
        type=floats,
        default=floats(DEFAULT_RATES),
        help="publications/s of the fanout-sse steps (default as --ws-rates)",
    )
    p.add_argument(
        "--step-duration", type=float, default=5.0, help="seconds per fan-out step (default 5)"
    )
    p.add_argument(
        "--idle-clients", type=int, default=5000, help="connections held by the idle runs"
    )
    p.add_argument(
        "--idle-hold", type=float, default=5.0, help="seconds the idle connections are held"
    )
    p.add_argument(
        "--light-clients", type=int, default=5000, help="WebSocket subscribers of the light steps"
    )
    p.add_argument(
        "--light-ws-rates",
        type=floats,
        default=floats("2,10"),
        help="publications/s of the WebSocket light steps (default 2,10)",
    )
    p.add_argument(
        "--light-sse-clients", type=int, default=2000, help="SSE subscribers of the light steps"
    )
    p.add_argument(
        "--light-sse-rates",
        type=floats,
        default=floats("10,30"),
        help="publications/s of the SSE light steps (default 10,30)",
    )
    p.add_argument(
        "--light-duration", type=float, default=20.0, help="seconds per light step (default 20)"
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the light section this many times, the servers' order reversed every "
        "other round (A B, B A, ...), so that a machine whose speed drifts favours none; "
        "each round compared on its own (default 1)",
    )
    p.add_argument(
        "--connect-rate", type=float, default=500.0, help="client connects/s (default 500)"
    )
    p.add_argument(
        "--payload-bytes", type=int, default=64, help="padding per publication (default 64)"
    )
    p.add_argument(
        "--p99-limit-ms",
        type=float,
        default=250.0,
        help="a fan-out step fails at this p99 or above (default 250)",
    )
    p.add_argument(
        "--server-cpus",
        type=cpus,
        default=None,
        help="CPUs of the server under test (default: the first usable CPU)",
    )
    p.add_argument(
        "--loadgen-cpus",
        type=cpus,
        default=None,
        help="CPUs of the clients, publisher, redis-server and Nchan's publisher nginx "
        "(default: the others)",
    )
    p.add_argument(
        "--quiet-threshold",
        type=float,
        default=50.0,
        help="before each run wait until every CPU is below this %% busy "
        "(a shared machine; 0: do not wait)",
    )
    p.add_argument(
        "--quiet-max-wait",
        type=float,
        default=300.0,
        help="seconds to wait at most for --quiet-threshold (default 300)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="profile the gateway with py-spy in an extra WebSocket fan-out run",
    )
    p.add_argument(
        "--reuse",
        type=Path,
        metavar="DIR",
        help="take the reports of the servers not in --targets from an earlier --out-dir",
    )
    p.add_argument("--out-dir", type=Path, help="default loadtest-results/compare-<time>")
    p.add_argument(
        "--doc",
        type=Path,
        default=Path("docs/benchmarks.md"),
        help="the document whose loadtest:compare section is rewritten",
    )
    p.add_argument("--no-doc", action="store_true", help="leave --doc alone")
    p.add_argument("--quiet", action="store_true", help="no progress bar on stderr")


def base_setup(args: argparse.Namespace, target: str, transport: str) -> Setup:
    return Setup(
        target=target,
        transport=transport,  # type: ignore[arg-type]
        broker="redis",
        publish_via="redis",
        server_cpus=args.server_cpus,
        loadgen_cpus=args.loadgen_cpus,
        connect_rate=args.connect_rate,
        pad_bytes=args.payload_bytes,
        p99_limit_ms=args.p99_limit_ms,
        quiet=args.quiet,
    )


def plan(args: argparse.Namespace, targets: list[str] | None = None) -> list[dict[str, Any]]:
    """The runs, in order: (section, target, transport, scenario keyword arguments)."""
    # "none": run nothing, only render the --reuse'd reports into the document.
    sections = [s.strip() for s in args.sections.split(",") if s.strip() not in ("", "none")]
    if targets is None:
        targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [s for s in sections if s not in SECTIONS] + [t for t in targets if t not in TARGETS]
    if unknown:
        raise SystemExit(f"compare: unknown section or target: {', '.join(unknown)}")
    runs: list[dict[str, Any]] = []
    for section in sections:
        for name in targets:
            target = TARGETS[name]
            if section == "fanout-ws" and "ws" in target.dialects:
                runs.append(
                    {
                        "section": section,
                        "target": name,
                        "transport": "ws",
                        "clients": args.ws_clients,
                        "rates": args.ws_rates,
                    }
                )
            elif section == "fanout-sse" and "sse" in target.dialects:
                runs.append(
                    {
                        "section": section,
                        "target": name,
                        "transport": "sse",
                        "clients": args.sse_clients,
                        "rates": args.sse_rates,
                    }
                )
            elif section == "idle":
                for transport in target.transports:
                    runs.append(
                        {
                            "section": section,
                            "target": name,
                            "transport": transport,
                            "clients": args.idle_clients,
                        }
                    )
            elif section == "light":
                runs += light_runs(args, name)
    if args.rounds > 1:
        runs = in_rounds(runs, targets, args.rounds)
    if args.profile and "gateway" in targets:
        # A run of its own: py-spy takes a good part of a client core, so the measured
        # runs go without it. Its rate is the gateway's first failing fan-out rate.
        runs.append(
            {
                "section": "profile",
                "target": "gateway",
                "transport": "ws",
                "clients": args.ws_clients,
                "rates": [args.ws_rates[0]],
            }
        )
    return runs


def light_runs(args: argparse.Namespace, name: str) -> list[dict[str, Any]]:
    steps = {
        "ws": (args.light_clients, args.light_ws_rates),
        "sse": (args.light_sse_clients, args.light_sse_rates),
    }
    runs = []
    for transport in TARGETS[name].transports:
        clients, rates = steps[transport]
        if clients > 0 and rates:
            runs.append(
                {
                    "section": "light",
                    "target": name,
                    "transport": transport,
                    "clients": clients,
                    "rates": list(rates),
                }
            )
    return runs


def in_rounds(runs: list[dict[str, Any]], targets: list[str], rounds: int) -> list[dict[str, Any]]:
    """``runs`` with the light ones repeated ``rounds`` times where the first of them
    stood, each round's servers in the order of ``targets``, reversed every other round."""
    light = [r for r in runs if r["section"] == "light"]
    if not light:
        return runs
    at = runs.index(light[0])
    rest = [r for r in runs if r["section"] != "light"]
    repeated = []
    for number in range(1, rounds + 1):
        order = targets if number % 2 else targets[::-1]
        for name in order:
            repeated += [{**r, "round": number} for r in light if r["target"] == name]
    return rest[:at] + repeated + rest[at:]


def setup_of(args: argparse.Namespace, run: dict[str, Any]) -> Setup:
    """``run``'s setup: the light steps' clients read with the kernel's receive times."""
    setup = base_setup(args, run["target"], run["transport"])
    setup.kernel_stamps = run["section"] == "light"
    return setup


async def run_one(args: argparse.Namespace, run: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    setup = setup_of(args, run)
    stem = f"{run['section']}-{run['target']}-{run['transport']}"
    if "round" in run:
        stem += f"-round{run['round']}"
    setup.out = out_dir / f"{stem}.json"
    if run["section"] == "idle":
        return await run_idle(setup, clients=run["clients"], hold=args.idle_hold)
    if run["section"] == "light":
        return await run_fanout(
            setup, clients=run["clients"], rates=run["rates"], step_duration=args.light_duration
        )
    if run["section"] == "profile":
        return await run_fanout(
            setup,
            clients=run["clients"],
            rates=run["rates"],
            step_duration=args.step_duration,
            profile=out_dir / f"{stem}.pyspy.raw",
        )
    return await run_fanout(
        setup,
        clients=run["clients"],
        rates=run["rates"],
        step_duration=args.step_duration,
        stop_on_fail=True,
    )


def profile_rate(results: list[dict[str, Any]], default: float) -> float:
    """The gateway's first failing WebSocket fan-out rate: a load that saturates it."""
    for row in results:
        if row["section"] == "fanout-ws" and row["target"] == "gateway":
            for step in row["report"].get("steps", []):
                if not step["ok"]:
                    return float(step["rate"])
            steps = row["report"].get("steps") or [{"rate": default}]
            return float(steps[-1]["rate"])
    return default


def everything_of(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with every section (and the profile run) planned."""
    return argparse.Namespace(
        **{**vars(args), "sections": ",".join(SECTIONS), "profile": True, "rounds": 1}
    )


def reuse(args: argparse.Namespace, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Reports of the servers this run leaves out, from an earlier run's ``--out-dir``
    (``--reuse``): the baselines do not change when the gateway does."""
    if args.reuse is None:
        return []
    planned = {(r["section"], r["target"], r["transport"]) for r in runs}
    found = []
    for run in plan(everything_of(args), list(TARGETS)):
        key = (run["section"], run["target"], run["transport"])
        path = args.reuse / f"{run['section']}-{run['target']}-{run['transport']}.json"
        if key in planned or not path.exists():
            continue
        report = json.loads(path.read_text())
        found.append({**run, "report": report, "reused_from": str(args.reuse)})
    return found


async def run_compare(args: argparse.Namespace, argv: list[str]) -> int:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = args.out_dir or Path("loadtest-results") / f"compare-{stamp}"
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = plan(args)
    command = "python -m loadtest " + shlex.join(argv)
    started = time.time()
    results: list[dict[str, Any]] = []
    reused = reuse(args, runs)
    for i, run in enumerate(runs, 1):
        which = f", round {run['round']}" if "round" in run else ""
        print(
            f"[{i}/{len(runs)}] {run['section']}: {run['target']} ({run['transport']}){which}",
            flush=True,
        )
        if args.quiet_threshold > 0:
            busy, waited = await wait_for_quiet(args.quiet_threshold, max_wait=args.quiet_max_wait)
            run["machine_busy_before"] = busy
            run["waited_for_quiet_s"] = round(waited, 1)
            if waited >= 3.5:
                print(f"  waited {waited:.0f} s for the machine to calm down: {busy}", flush=True)
        if run["section"] == "profile":
            run["rates"] = [profile_rate(results, run["rates"][0])]
        try:
            report = await run_one(args, run, out_dir)
        except Exception as exc:  # one server failing must not lose the others' results
            print(f"  failed: {type(exc).__name__}: {exc}", flush=True)
            report = {"error": f"{type(exc).__name__}: {exc}"}
        results.append({**run, "report": report})
    elapsed = time.time() - started
    if reused:
        order = {
            (r["section"], r["target"], r["transport"]): i
            for i, r in enumerate(plan(everything_of(args), list(TARGETS)))
        }
        results = sorted(
            results + reused,
            key=lambda r: order.get((r["section"], r["target"], r["transport"]), len(order)),
        )
    section = render_section(results, machine_info(), command, elapsed, args)
    (out_dir / "benchmarks-section.md").write_text(section)
    if not args.no_doc:
        write_section(args.doc, section)
        print(f"wrote {args.doc}")
    print(section)
    return 0
