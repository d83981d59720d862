"""``python -m loadtest``: the scenarios, compare, sendfloor, hotpath, connectpath,
arrival (loadtest/README.md)."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import orjson

from loadtest.argtypes import cpus, floats
from loadtest.config import Setup
from loadtest.hookreport import CONNECT_VARIANTS, PARTS
from loadtest.report import summary_text
from loadtest.targets import TARGETS


def env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def names_of(*allowed: str) -> Callable[[str], list[str]]:
    """A comma-separated subset of ``allowed``, in the order given."""

    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of {', '.join(allowed)}"
            )
        return names

    return parse


def share(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError("a share between 0 and 1")
    return value


def add_target_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server under test")
    g.add_argument("--target", choices=sorted(TARGETS), default="gateway")
    g.add_argument("--transport", choices=["ws", "sse"], default="ws")
    g.add_argument(
        "--url",
        help="an already running server (http://host:port); default: start one on 127.0.0.1",
    )
    g.add_argument(
        "--server-pid",
        type=int,
        help="pid of --url's server process for CPU and "
        "memory figures (default: found from the port when local)",
    )
    g.add_argument("--token", help="gateway JWT allowing subscribe and publish on '*'")
    g.add_argument(
        "--jwt-secret", help="HS256 secret to make tokens with (and to start the gateway with)"
    )
    g.add_argument(
        "--broker",
        choices=["memory", "redis"],
        default="memory",
        help="broker of a gateway the tool starts (default memory)",
    )
    g.add_argument(
        "--publish-via",
        choices=["api", "redis"],
        default="api",
        help="gateway: POST /api/publish, or its Redis broker's publish path "
        "(implies --broker redis); baselines always use Redis",
    )
    g.add_argument("--redis-url", help="Redis to use (default: start a redis-server)")
    g.add_argument("--redis-prefix", default="gw", help="gateway GATEWAY_BROKER_PREFIX")
    g.add_argument(
        "--server-env",
        type=env_pair,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment of a gateway the tool starts",
    )
    g.add_argument(
        "--server-cpus",
        type=cpus,
        help="CPUs for a server the tool starts (default: the first usable CPU)",
    )


def add_load_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("load generator")
    g.add_argument(
        "--loadgen-cpus",
        type=cpus,
        help="CPUs for the clients, publisher and redis-server (default: all but the server's)",
    )
    g.add_argument(
        "--workers",
        type=int,
        help="client processes (default: one per load "
        "generator CPU, more when file descriptors require)",
    )
    g.add_argument("--connect-rate", type=float, default=1000.0, help="new connections/s")
    g.add_argument("--connect-timeout", type=float, default=15.0)
    g.add_argument(
        "--per-source-limit",
        type=int,
        default=25_000,
        help="connections per loopback source address (127.0.0.2, .3, ...)",
    )
    g.add_argument(
        "--slow-share",
        type=share,
        default=0.0,
        help="share of slow consumers (read once per --slow-interval)",
    )
    g.add_argument("--slow-interval", type=float, default=1.0)
    g.add_argument("--slow-rcvbuf", type=int, default=8192)
    g.add_argument(
        "--kernel-stamps",
        action="store_true",
        help="read with the kernel's receive times (SO_TIMESTAMPNS): each step's latency "
        "also at arrival in the client's kernel, apart from the clients' own queue",
    )
    g.add_argument("--payload-bytes", type=int, default=64, help="padding per payload")
    g.add_argument(
        "--drain-timeout",
        type=float,
        default=10.0,
        help="seconds to wait after a step for deliveries to arrive",
    )
    g.add_argument("--p99-limit-ms", type=float, default=250.0)


def add_output_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--out", type=Path, help="JSON report (default loadtest-results/…json)")
    g.add_argument("--plot", type=Path, help="PNG plot (default: next to the JSON)")
    g.add_argument("--no-plot", action="store_true")
    g.add_argument("--json", action="store_true", help="print the JSON report on stdout")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest",
        description="Load tests for the gateway and the baselines it is compared with.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def scenario(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_target_options(p)
        add_load_options(p)
        add_output_options(p)
        return p

    p = scenario("fanout", "N subscribers on one channel, stepped publication rates")
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--rates", type=floats, default=floats("10,20,50"), help="e.g. 10,50,100")
    p.add_argument("--step-duration", type=float, default=10.0)
    p.add_argument(
        "--stop-on-fail",
        action="store_true",
        help="stop after the first step that fails (loss, p99, publish rate)",
    )
    p.add_argument(
        "--py-spy",
        type=Path,
        metavar="RAW",
        help="record a py-spy profile of the server during the steps into RAW",
    )
    p.add_argument(
        "--trace",
        type=Path,
        metavar="JSON",
        help="gateway: timestamps along each publication's way through the worker "
        "(loadtest/tracing.py) into JSON, and the latency breakdown per step in the report",
    )
    p.add_argument(
        "--instructions",
        action="store_true",
        help="a Python server: also count its user-space instructions per delivery under "
        "valgrind's callgrind (the server runs ~50x slower: use a few hundred clients and "
        "a low rate)",
    )

    p = scenario("idle", "N idle subscribed connections: server memory per connection")
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--hold", type=float, default=10.0, help="seconds to hold them")

    p = scenario("channels", "many channels, few subscribers each")
    p.add_argument("--channels", type=int, default=100)
    p.add_argument("--subscribers", type=int, default=5, help="per channel")
    p.add_argument(
        "--rates", type=floats, default=floats("100,200"), help="publications/s over all channels"
    )
    p.add_argument("--step-duration", type=float, default=10.0)
    p.add_argument(
        "--publish-lanes",
        type=int,
        default=4,
        help="channels published concurrently (each channel stays in order)",
    )
    p.add_argument("--stop-on-fail", action="store_true")

    p = scenario("connect", "server CPU per connect + subscribe, per close, per cycle")
    p.add_argument("--clients", type=int, default=3000)
    p.add_argument(
        "--recover",
        type=int,
        default=0,
        metavar="K",
        help="gateway: each subscribe recovers K publications from history",
    )
    p.add_argument(
        "--distinct-tokens",
        action="store_true",
        help="a token of its own for every client (default: one token for all)",
    )
    p.add_argument(
        "--live-channel",
        action="store_true",
        help="one client stays subscribed throughout, so that the server relays the "
        "channel (with --recover: a reconnect to a live channel)",
    )
    p.add_argument(
        "--distinct-channels",
        action="store_true",
        help="a channel of its own for every client, one the server does not relay yet "
        "(per-user channels, a fresh worker)",
    )
    p.add_argument(
        "--instructions",
        action="store_true",
        help="a Python server (the gateway, a baseline): also count its user-space "
        "instructions per connect, close and cycle under valgrind's callgrind (the same on "
        "a busy machine; the server runs ~50x slower: use a few hundred clients and a long "
        "--connect-timeout)",
    )

    p = scenario("churn", "connects and disconnects per second beside steady subscribers")
    p.add_argument("--clients", type=int, default=500, help="steady subscribers")
    p.add_argument("--churn-rate", type=float, default=100.0, help="connect+close per second")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--rate", type=float, default=10.0, help="publications/s meanwhile")
    p.add_argument("--hold", type=float, default=0.0, help="seconds a churned client stays")

    p = scenario(
        "storm",
        "clients resuming from their last offset while their connections, gateways or "
        "Redis are taken away (--mode)",
    )
    p.add_argument("--clients", type=int, default=5000)
    p.add_argument("--channels", type=int, default=5, help="channels, clients spread over them")
    p.add_argument("--rate", type=float, default=10.0, help="publications/s, over the channels")
    p.add_argument("--duration", type=float, default=12.0, help="seconds of publishing")
    p.add_argument(
        "--cut-after",
        type=float,
        default=3.0,
        help="seconds into publishing when the cut, the crash, the first restart or the "
        "Redis restart happens",
    )
    p.add_argument(
        "--mode",
        choices=["cut", "jitter", "deploy", "crash", "redis-restart"],
        default="cut",
        help="cut: every connection reset at once; jitter: each client reset at random "
        "about every --jitter-every s, offline about --offline s; deploy: a rolling restart "
        "of the gateways; crash: SIGKILL one gateway; redis-restart: Redis stopped and "
        "started again empty (default cut)",
    )
    p.add_argument(
        "--gateways",
        type=int,
        default=1,
        help="single-worker gateways on ports of their own behind Redis (implies "
        "--broker redis); clients pick one at random (default 1: one server)",
    )
    p.add_argument(
        "--jitter-every",
        type=float,
        help="mean s between a client's random cuts (default: 15 for jitter and "
        "redis-restart, so that clients resume across the restart too; 0 otherwise)",
    )
    p.add_argument(
        "--offline", type=float, default=2.0, help="mean s a randomly cut client stays away"
    )
    p.add_argument(
        "--redis-down", type=float, default=2.0, help="redis-restart: s Redis stays down"
    )
    p.add_argument(
        "--history-size",
        type=int,
        default=100,
        help="GATEWAY_HISTORY_SIZE of the gateways (and of the publisher's broker)",
    )
    p.add_argument(
        "--restart-pause",
        type=float,
        default=5.0,
        help="deploy: s between one gateway ready and the next one's SIGTERM; crash: s "
        "before the killed gateway starts again",
    )

    p = scenario("hooks", "connects/s and publishes/s with and without backend hooks")
    p.add_argument(
        "--parts",
        type=names_of(*PARTS),
        default=list(PARTS),
        help="connects, publishes or both (default both)",
    )
    p.add_argument("--clients", type=int, default=2000, help="clients per connect run")
    p.add_argument("--concurrency", type=int, default=50, help="connects in flight at once")
    p.add_argument(
        "--connect-variants",
        type=names_of(*CONNECT_VARIANTS),
        default=list(CONNECT_VARIANTS),
        help="gateways to connect to: without hooks, with a connect hook, with a subscribe "
        "hook on every channel (default all three)",
    )
    p.add_argument("--publishers", type=int, default=50, help="publishing WebSocket connections")
    p.add_argument("--window", type=int, default=1, help="publishes in flight per connection")
    p.add_argument("--publish-duration", type=float, default=5.0, help="seconds per run")
    p.add_argument(
        "--rounds", type=int, default=2, help="times each variant runs, alternating (default 2)"
    )
    p.add_argument("--hook-timeout", type=float, default=2.0, help="each hook's timeout (s)")
    p.add_argument(
        "--py-spy",
        type=Path,
        metavar="DIR",
        help="record a py-spy profile of the gateway during every run into DIR",
    )
    # Connects as fast as the server takes them: --concurrency is the only bound.
    p.set_defaults(connect_rate=1_000_000.0)

    from loadtest.arrival import add_parser as add_arrival_parser
    from loadtest.compare import add_compare_parser
    from loadtest.connectpath import add_parser as add_connectpath_parser
    from loadtest.hotpath import add_parser as add_hotpath_parser
    from loadtest.sendfloor import add_parser as add_sendfloor_parser

    add_compare_parser(sub)
    add_sendfloor_parser(sub)
    add_hotpath_parser(sub)
    add_connectpath_parser(sub)
    add_arrival_parser(sub)
    return parser


def _emit(
    report: dict[str, Any], summary: Callable[[dict[str, Any]], str], *, as_json: bool
) -> int:
    """A report on stdout: its JSON, or the one-paragraph summary."""
    text = orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() if as_json else summary(report)
    sys.stdout.write(text + "\n")
    return 0


def setup_from(args: argparse.Namespace, argv: list[str]) -> Setup:
    target = TARGETS[args.target]
    transport = args.transport
    if transport not in target.dialects:
        transport = target.transports[0]
    broker = args.broker
    gateways = getattr(args, "gateways", 1)
    publish_via = args.publish_via
    if gateways > 1:
        broker = publish_via = "redis"  # the gateways share Redis; any of them may be down
    if publish_via == "redis" and args.url is None:
        broker = "redis"
    return Setup(
        target=args.target,
        transport=transport,
        url=args.url,
        server_pid=args.server_pid,
        token=args.token,
        jwt_secret=args.jwt_secret,
        broker=broker,
        publish_via=publish_via,
        redis_url=args.redis_url,
        redis_prefix=args.redis_prefix,
        server_env=dict(args.server_env),
        gateways=gateways,
        history_size=getattr(args, "history_size", 100),
        server_cpus=args.server_cpus,
        loadgen_cpus=args.loadgen_cpus,
        workers=args.workers,
        connect_rate=args.connect_rate,
        connect_timeout=args.connect_timeout,
        per_source_limit=args.per_source_limit,
        slow_share=args.slow_share,
        slow_interval=args.slow_interval,
        slow_rcvbuf=args.slow_rcvbuf,
        kernel_stamps=getattr(args, "kernel_stamps", False),
        pad_bytes=args.payload_bytes,
        publish_lanes=getattr(args, "publish_lanes", 1),
        drain_timeout=args.drain_timeout,
        p99_limit_ms=args.p99_limit_ms,
        out=args.out,
        plot=args.plot,
        no_plot=args.no_plot,
        quiet=args.quiet,
        command="python -m loadtest " + shlex.join(argv),
    )


def scenario_coroutine(args: argparse.Namespace, setup: Setup) -> Coroutine[Any, Any, Any]:
    from loadtest import scenarios

    if args.command == "fanout":
        return scenarios.run_fanout(
            setup,
            clients=args.clients,
            rates=args.rates,
            step_duration=args.step_duration,
            stop_on_fail=args.stop_on_fail,
            profile=args.py_spy,
            trace=args.trace,
            instructions=args.instructions,
        )
    if args.command == "idle":
        return scenarios.run_idle(setup, clients=args.clients, hold=args.hold)
    if args.command == "channels":
        return scenarios.run_channels(
            setup,
            channels=args.channels,
            subscribers=args.subscribers,
            rates=args.rates,
            step_duration=args.step_duration,
            stop_on_fail=args.stop_on_fail,
        )
    if args.command == "connect":
        return scenarios.run_connect(
            setup,
            clients=args.clients,
            recover=args.recover,
            distinct_tokens=args.distinct_tokens,
            live_channel=args.live_channel,
            distinct_channels=args.distinct_channels,
            instructions=args.instructions,
        )
    if args.command == "hooks":
        return scenarios.run_hooks(
            setup,
            parts=args.parts,
            clients=args.clients,
            concurrency=args.concurrency,
            connect_variants=args.connect_variants,
            publishers=args.publishers,
            window=args.window,
            publish_duration=args.publish_duration,
            rounds=args.rounds,
            hook_timeout=args.hook_timeout,
            profile_dir=args.py_spy,
        )
    if args.command == "storm":
        return scenarios.run_storm(
            setup,
            clients=args.clients,
            channels=args.channels,
            rate=args.rate,
            duration=args.duration,
            cut_after=args.cut_after,
            mode=args.mode,
            jitter_every=args.jitter_every,
            offline=args.offline,
            redis_down=args.redis_down,
            restart_pause=args.restart_pause,
        )
    return scenarios.run_churn(
        setup,
        clients=args.clients,
        churn_rate=args.churn_rate,
        duration=args.duration,
        rate=args.rate,
        hold=args.hold,
    )


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvicorn[standard] brings it
        import asyncio

        return asyncio.run(coro)
    return uvloop.run(coro)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command == "compare":
        from loadtest.compare import run_compare

        return int(run(run_compare(args, argv)))
    if args.command == "hotpath":
        from loadtest.hotpath import run_hotpath
        from loadtest.hotpath import summary as hotpath_summary

        costs = run_hotpath(sessions=args.sessions, publications=args.publications)
        return _emit(costs, hotpath_summary, as_json=args.json)
    if args.command == "connectpath":
        from loadtest.connectpath import run_connectpath
        from loadtest.connectpath import summary as connectpath_summary

        stages = run_connectpath(cycles=args.cycles, rounds=args.rounds, recover=args.recover)
        return _emit(stages, connectpath_summary, as_json=args.json)
    if args.command == "arrival":
        from loadtest.arrival import Crowd, run_arrival
        from loadtest.arrival import summary as arrival_summary

        crowd = Crowd(
            clients=args.clients,
            transport=args.transport,
            distinct_channels=args.distinct_channels,
            broker=args.broker,
            timeout=args.timeout,
            server_cpus=cpus(args.server_cpus) or None,
            loadgen_cpus=cpus(args.loadgen_cpus) or None,
            presence=args.presence,
        )
        arrival = run_arrival(crowd, [int(b) for b in args.backlogs.split(",") if b.strip()])
        return _emit(arrival, arrival_summary, as_json=args.json)
    if args.command == "sendfloor":
        from loadtest.sendfloor import run_sendfloor, summary

        floor = run_sendfloor(
            clients=args.clients,
            rounds=args.rounds,
            rate=args.rate,
            payload_bytes=args.payload_bytes,
            sender_cpus=cpus(args.sender_cpus) or None,
            receiver_cpus=cpus(args.receiver_cpus) or None,
        )
        return _emit(floor, summary, as_json=args.json)
    setup = setup_from(args, argv)
    try:
        report = run(scenario_coroutine(args, setup))
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    if args.json:
        options = orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS  # as the JSON file is written
        sys.stdout.write(orjson.dumps(report, option=options).decode() + "\n")
    elif args.command == "hooks":
        from loadtest.hookreport import summary as hooks_summary

        sys.stdout.write(hooks_summary(report) + "\n")
    else:
        sys.stdout.write(summary_text(report) + "\n")
    return 0
