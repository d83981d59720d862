"""Smoke test of ``python -m loadtest``: a tiny run of every scenario, and of every baseline.

Each run is the real command line in a subprocess (it starts its own server, client worker
and, when asked, talks to this suite's redis-server). The runs are independent, so they
all start at once and the tests then read their JSON reports; the ``hooks`` runs, which
publish flat out, start once the others have ended, and the ``storm`` modes, which start
three gateways each, once those have. The load is tiny (tens of clients,
a few publications per second): the assertions check that the figures are consistent -
nothing lost, counts that add up - never how fast anything was.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from loadtest.benchdoc import light_table, light_vs_nchan
from loadtest.compare import add_compare_parser, plan, setup_of
from loadtest.nchan import NchanMissing, require_nchan
from tests.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent
# Every run of a batch starts at once (a gateway or baseline, client processes, nginx for
# Nchan): on a busy 2-core machine a server can take half a minute to answer. Deadlines,
# not expectations: a run normally ends within seconds.
RUN_TIMEOUT = 200.0
STORM_TIMEOUT = 200.0  # five runs starting three gateways each, all at once
pytestmark = pytest.mark.timeout(RUN_TIMEOUT + 60)
BASELINES = [
    "fastapi_tutorial",
    "sse_starlette",
    "websockets_broadcast",
    "socketio",
    "socketio_node",
]


def runs(redis_url: str) -> dict[str, list[str]]:
    """Name -> arguments of ``python -m loadtest``."""
    # Latency is measured and reported, never a pass criterion here (a shared machine):
    # a step fails on loss or a publisher that cannot keep up, not on its p99.
    common = ["--quiet", "--connect-timeout", "20", "--drain-timeout", "15"]
    common += ["--p99-limit-ms", "600000"]
    result = {
        "fanout-ws": [
            "fanout",
            "--clients",
            "20",
            "--rates",
            "5,10",
            "--step-duration",
            "2",
            "--slow-share",
            "0.1",
            *common,
        ],
        "fanout-sse": [
            "fanout",
            "--transport",
            "sse",
            "--clients",
            "20",
            "--rates",
            "10",
            "--step-duration",
            "2",
            "--no-plot",
            "--kernel-stamps",
            *common,
        ],
        "fanout-redis": [
            "fanout",
            "--publish-via",
            "redis",
            "--redis-url",
            redis_url,
            "--redis-prefix",
            "smoke",
            "--clients",
            "20",
            "--rates",
            "10",
            "--step-duration",
            "2",
            "--instructions",
            "--kernel-stamps",
            "--no-plot",
            *common,
        ],
        "idle": ["idle", "--clients", "20", "--hold", "0.5", "--no-plot", *common],
        "connect": [
            "connect",
            "--clients",
            "20",
            "--recover",
            "3",
            "--live-channel",
            "--instructions",
            "--connect-timeout",
            "60",
            "--no-plot",
            *common,
        ],
        "connect-channels": [
            "connect",
            "--transport",
            "sse",
            "--clients",
            "20",
            "--distinct-channels",
            "--no-plot",
            *common,
        ],
        "channels": [
            "channels",
            "--channels",
            "4",
            "--subscribers",
            "5",
            "--rates",
            "20",
            "--step-duration",
            "2",
            "--per-source-limit",
            "10",
            "--no-plot",
            *common,
        ],
        "churn": [
            "churn",
            "--clients",
            "10",
            "--churn-rate",
            "10",
            "--duration",
            "2",
            "--rate",
            "5",
            "--no-plot",
            *common,
        ],
        "storm": [
            "storm",
            "--clients",
            "20",
            "--channels",
            "2",
            "--rate",
            "5",
            "--duration",
            "3",
            "--cut-after",
            "1",
            "--broker",
            "redis",
            "--redis-url",
            redis_url,
            "--server-env",
            "GATEWAY_WORKERS=2",
            "--no-plot",
            *common,
        ],
    }
    # Nchan: two nginx (subscribers; publisher, taking HTTP POSTs) on the suite's Redis.
    for transport in ("ws", "sse"):
        result[f"nchan-{transport}"] = [
            "fanout", "--target", "nchan", "--transport", transport, "--redis-url", redis_url,
            "--clients", "20", "--rates", "5,10", "--step-duration", "1", "--no-plot", *common,
        ]  # fmt: skip
        if transport == "ws":  # picows' protocol over the kernel-stamped reads
            result["nchan-ws"].append("--kernel-stamps")
    for name in BASELINES:
        transport = "sse" if name == "sse_starlette" else "ws"
        result[f"baseline-{name}"] = [
            "fanout", "--target", name, "--transport", transport, "--redis-url", redis_url,
            "--clients", "10", "--rates", "10", "--step-duration", "1", "--no-plot", *common,
        ]  # fmt: skip
    return result


def storm_runs() -> dict[str, list[str]]:
    """``storm``'s modes against three single-worker gateways behind a Redis of their
    own, in a batch of their own after the others (each run starts three gateways)."""
    common = ["--quiet", "--connect-timeout", "20", "--drain-timeout", "15"]
    common += ["--p99-limit-ms", "600000", "--no-plot", "--gateways", "3"]
    common += ["--clients", "30", "--channels", "2", "--rate", "10", "--cut-after", "1"]
    jitter = ["--jitter-every", "2", "--offline", "0.5"]
    return {
        "storm-cut": ["storm", "--mode", "cut", "--duration", "4", *common],
        "storm-jitter": ["storm", "--mode", "jitter", "--duration", "6", *jitter, *common],
        "storm-deploy": [
            "storm", "--mode", "deploy", "--duration", "8", "--restart-pause", "0.5", *common,
        ],
        "storm-crash": [
            "storm", "--mode", "crash", "--duration", "6", "--restart-pause", "1", *common,
        ],
        "storm-history": [
            "storm", "--mode", "jitter", "--duration", "6", "--history-size", "3", *jitter,
            *common,
        ],
        "storm-redis-restart": [
            "storm", "--mode", "redis-restart", "--duration", "6", "--redis-down", "0.5",
            *jitter, *common,
        ],
    }  # fmt: skip


def hook_runs() -> dict[str, list[str]]:
    """The two parts of ``hooks`` as two runs side by side, in a batch of their own after
    the others: they publish flat out, which would make the paced publishers of the
    other runs fall behind their rates."""
    common = ["--quiet", "--connect-timeout", "20"]
    return {
        "hooks-connects": [
            "hooks",
            "--parts",
            "connects",
            "--clients",
            "20",
            "--concurrency",
            "5",
            "--rounds",
            "1",
            *common,
        ],
        "hooks-publishes": [
            "hooks",
            "--parts",
            "publishes",
            "--publishers",
            "2",
            "--window",
            "2",
            "--publish-duration",
            "0.5",
            "--rounds",
            "1",
            "--no-plot",
            *common,
        ],
    }


@dataclass
class Run:
    name: str
    out: Path
    proc: subprocess.Popen[bytes]
    log: Path
    report: dict[str, Any] = field(default_factory=dict)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def start_all(
    runs: dict[str, list[str]], tmp: Path, timeout: float = RUN_TIMEOUT
) -> Iterator[dict[str, Run]]:
    """Start every run at once, wait for all (at most ``timeout``), read their
    reports; whatever still runs when the caller is done is killed."""
    started: dict[str, Run] = {}
    try:
        for name, args in runs.items():
            out = tmp / f"{name}.json"
            log = tmp / f"{name}.log"
            with log.open("wb") as sink:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "loadtest", *args, "--out", str(out)],
                    cwd=ROOT,
                    stdout=sink,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            started[name] = Run(name, out, proc, log)
        deadline = time.monotonic() + timeout
        for run in started.values():
            try:
                run.proc.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                run.proc.kill()
                run.proc.wait()
            if run.proc.returncode == 0 and run.out.exists():
                run.report = json.loads(run.out.read_text())
        yield started
    finally:
        for run in started.values():
            if run.proc.poll() is None:
                run.proc.kill()
                run.proc.wait()


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Run]]:
    server = RedisServer().start()
    try:
        yield from start_all(runs(server.url), tmp_path_factory.mktemp("loadtest"))
    finally:
        server.close()


@pytest.fixture(scope="module")
def hook_reports(
    reports: dict[str, Run], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Run]]:
    """After ``reports``: its runs have all ended before these start."""
    yield from start_all(hook_runs(), tmp_path_factory.mktemp("loadtest-hooks"))


@pytest.fixture(scope="module")
def storm_reports(
    hook_reports: dict[str, Run], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Run]]:
    """After ``hook_reports``: its runs have all ended before these start."""
    yield from start_all(storm_runs(), tmp_path_factory.mktemp("loadtest-storm"), STORM_TIMEOUT)


def report_of(reports: dict[str, Run], name: str) -> dict[str, Any]:
    run = reports[name]
    assert run.proc.returncode == 0, f"{name} exited with {run.proc.returncode}:\n{run.output()}"
    assert run.report, f"{name} wrote no report:\n{run.output()}"
    return run.report


def check_deliveries(
    report: dict[str, Any],
    subscribers: int,
    published_per_step: list[int],
    per_channel: int | None = None,
) -> None:
    """Every publication reached every normal subscriber of its channel once, and the
    counts add up. ``per_channel``: subscribers per channel when there are several."""
    conns = report["connections"]
    assert conns["failed"] == 0, conns["failures"]
    assert conns["subscribed"] == conns["requested"]
    assert conns["normal_closes"] == 0
    normal = subscribers - conns["slow"]
    assert conns["open_at_end"] == normal
    steps = report["steps"]
    assert [s["publish"]["published"] for s in steps] == published_per_step
    for step in steps:
        assert step["expected"] == step["publish"]["published"] * (per_channel or normal)
        assert step["delivered"] == step["expected"]
        assert step["lost"] == 0
        assert step["ok"], step["failures"]
        lat = step["latency_ms"]
        assert lat["count"] == step["delivered"]
        assert 0 <= lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
        assert step["server"]["cpu_percent"] is not None
        assert step["server"]["rss_mib_max"] > 0
        assert step["loadgen"]["cpu_percent"]
    deliveries = report["deliveries"]
    assert deliveries["lost"] == 0
    assert deliveries["duplicated"] == 0
    assert deliveries["delivered"] == sum(s["delivered"] for s in steps)
    assert deliveries["unrecognised"] == 0
    assert report["summary"]["max_rate_ok"] == max(s["rate"] for s in steps)
    assert sum(row["deliveries"] for row in report["timeseries"]) == deliveries["delivered"]


def test_fanout_ws_reports_every_delivery_and_slow_consumers(reports: dict[str, Run]) -> None:
    report = report_of(reports, "fanout-ws")
    assert report["target"] == {
        "name": "gateway",
        "description": report["target"]["description"],
        "transport": "ws",
        "publish_via": "api",
        "broker": "memory",
    }
    assert report["connections"]["slow"] == 2  # 10 % of 20
    check_deliveries(report, 20, [10, 20])
    assert report["deliveries"]["slow_consumer_received"] > 0
    assert report["server_metrics"]["gateway_publications_total"] == 30
    plot = Path(report["files"]["plot"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fanout_sse(reports: dict[str, Run]) -> None:
    report = report_of(reports, "fanout-sse")
    assert report["target"]["transport"] == "sse"
    check_deliveries(report, 20, [20])
    assert report["files"]["plot"] is None
    check_arrivals(report)


def check_arrivals(report: dict[str, Any]) -> None:
    """``--kernel-stamps``: every delivery also timed at its arrival in the client's
    kernel, which is never later than the client process read it."""
    for step in report["steps"]:
        read, arrived = step["latency_ms"], step["arrival_latency_ms"]
        assert arrived["count"] == read["count"] == step["delivered"]
        assert 0 < arrived["p50"] <= read["p50"]
        assert arrived["p99"] <= read["p99"] and arrived["max"] <= read["max"]


def test_fanout_without_kernel_stamps_reports_the_read_latency_alone(
    reports: dict[str, Run],
) -> None:
    assert all("arrival_latency_ms" not in s for s in report_of(reports, "fanout-ws")["steps"])


def test_fanout_through_the_gateways_redis_broker(reports: dict[str, Run]) -> None:
    report = report_of(reports, "fanout-redis")
    assert report["target"]["publish_via"] == "redis"
    assert report["target"]["broker"] == "redis"
    check_deliveries(report, 20, [20])
    check_arrivals(report)
    # --instructions: the server under callgrind, counted while the step ran.
    counted = report["instructions"]
    assert counted["delivered"] == report["steps"][0]["delivered"] == 400
    assert 500 < counted["per_delivery"] < 200_000, counted
    assert counted["total"] == pytest.approx(counted["per_delivery"] * 400, rel=0.01)


def test_idle_measures_memory_per_connection(reports: dict[str, Run]) -> None:
    report = report_of(reports, "idle")
    idle = report["idle"]
    assert idle["connections"] == 20
    assert idle["rss_before_mib"] > 0
    assert idle["rss_after_mib"] > 0
    assert isinstance(idle["per_connection_kib"], float)
    assert report["connections"]["subscribed"] == 20
    assert report["steps"] == []


def test_connect_measures_server_cpu_per_connect_and_close(reports: dict[str, Run]) -> None:
    report = report_of(reports, "connect")
    connect = report["connect"]
    assert (connect["clients"], connect["recover"], connect["live_channel"]) == (20, 3, True)
    assert report["connections"]["subscribed"] == 20
    assert report["connections"]["failed"] == 0
    per_connect, per_close = (
        connect["server_cpu_us_per_connect"],
        connect["server_cpu_us_per_close"],
    )
    assert per_connect > 0 and per_close >= 0
    assert connect["server_cpu_us_per_cycle"] == pytest.approx(per_connect + per_close, abs=0.2)
    # --instructions: the server ran under callgrind, counted for the measured phases only
    # (a connect of the gateway runs well over 50,000 instructions, start-up millions).
    counted = [connect[f"server_kinstructions_per_{phase}"] for phase in ("connect", "close")]
    assert 50 < counted[0] < 5000 and 5 < counted[1] < 5000, counted
    assert connect["server_kinstructions_per_cycle"] == pytest.approx(sum(counted), abs=0.2)


def test_connect_to_channels_of_their_own(reports: dict[str, Run]) -> None:
    """``--distinct-channels``: every client subscribed, each to a channel of its own."""
    report = report_of(reports, "connect-channels")
    connect = report["connect"]
    assert connect["distinct_channels"] is True and connect["live_channel"] is False
    assert report["connections"]["subscribed"] == 20
    assert report["connections"]["failed"] == 0
    assert connect["server_cpu_us_per_connect"] > 0


def test_channels_delivers_each_channel_to_its_subscribers(reports: dict[str, Run]) -> None:
    report = report_of(reports, "channels")
    assert report["config"]["channels"] == 4
    check_deliveries(report, 20, [40], per_channel=5)
    # 20 connections, 10 per source address: 127.0.0.2 and 127.0.0.3.
    assert "connections spread over 2 loopback source addresses" in report["notes"]


def test_churn_counts_connects_and_keeps_steady_subscribers_whole(
    reports: dict[str, Run],
) -> None:
    report = report_of(reports, "churn")
    churn = report["churn"]
    assert churn["attempted"] == 20
    assert churn["succeeded"] == 20
    assert churn["failed"] == 0
    assert churn["connect_latency_ms"]["count"] == 20
    check_deliveries(report, 10, [10])


def test_storm_brings_every_client_back_resumed_with_nothing_lost(
    reports: dict[str, Run],
) -> None:
    """Two gateway workers behind Redis; every connection reset mid-stream: each client
    is back, told it was recovered, and received every publication once, in order."""
    report = report_of(reports, "storm")
    storm = report["storm"]
    assert storm["connections_cut_at_once"] == storm["clients_back"] == 20
    assert storm["recovered"] == {"true": 20}
    assert storm["reconnect_ms"]["count"] == 20 and storm["reconnect_ms"]["p99"] > 0
    assert storm["disconnects_by_cause"] == {"cut": 20}
    assert set(storm["workers"]) == {"gateway-worker-0", "gateway-worker-1"}
    assert all(w["rss_mib_peak"] > 0 for w in storm["workers"].values())
    check_deliveries(report, 20, [15], per_channel=10)


def check_storm(report: dict[str, Any], clients: int = 30) -> dict[str, Any]:
    """Every client back; every publication history held delivered once, in order;
    whatever was skipped, skipped across a gap the gateway announced."""
    storm: dict[str, Any] = report["storm"]
    assert report["config"]["gateways"] == 3
    assert report["connections"]["subscribed"] == clients, report["connections"]
    assert storm["clients"] == storm["clients_back"] == clients
    assert storm["gave_up"] == 0
    checks = storm["targets"]["checks"]
    for name in ("delivered_of_history_held", "duplicates", "reordered", "unannounced_gaps"):
        assert checks[name]["ok"], (name, checks[name])
    deliveries = report["deliveries"]
    assert deliveries["lost"] == deliveries["unannounced_missing"] == 0
    assert deliveries["delivered"] + deliveries["announced_gaps_missed"] == deliveries["expected"]
    assert storm["gaps_announced"]["judged"].get("needless", 0) == 0
    assert storm["reconnects"] == sum(storm["disconnects_by_cause"].values()) > 0
    assert storm["reconnect_ms"]["count"] == storm["outage_ms"]["count"] == storm["reconnects"]
    assert set(storm["workers"]) >= {"gateway-0", "gateway-1", "gateway-2"}
    assert all(w["rss_mib_peak"] > 0 for w in storm["workers"].values())
    assert set(storm["memory_mib"]["after"]) == {"gateway-0", "gateway-1", "gateway-2"}
    return storm


def test_storm_cut_over_three_gateways(storm_reports: dict[str, Run]) -> None:
    storm = check_storm(report_of(storm_reports, "storm-cut"))
    assert storm["connections_cut_at_once"] == 30
    assert storm["disconnects_by_cause"] == {"cut": 30}
    assert storm["recovered"] == {"true": 30}


def test_storm_jitter_cuts_clients_at_random_and_each_resumes(
    storm_reports: dict[str, Run],
) -> None:
    storm = check_storm(report_of(storm_reports, "storm-jitter"))
    assert set(storm["disconnects_by_cause"]) == {"cut"}
    assert storm["reconnects"] >= 30  # about 3 s of cuts every ~2 s, 30 clients
    assert storm["recovered"].get("true", 0) == storm["reconnects"]


def test_storm_deploy_restarts_every_gateway_and_moves_every_client(
    storm_reports: dict[str, Run],
) -> None:
    report = report_of(storm_reports, "storm-deploy")
    storm = check_storm(report)
    # Every client was on some gateway when it drained: each got a 1012 at least once.
    assert storm["disconnects_by_cause"].get("close:1012", 0) >= 30
    assert storm["clients_reconnected"] == 30
    assert "gateway-2#1" in storm["workers"]
    assert [e["what"] for e in report["events"]].count("gateway-2 ready") == 1


def test_storm_crash_moves_the_killed_gateways_clients(storm_reports: dict[str, Run]) -> None:
    report = report_of(storm_reports, "storm-crash")
    storm = check_storm(report)
    assert storm["disconnects_by_cause"].get("eof", 0) > 0
    assert "gateway-0#1" in storm["workers"]


def test_storm_positions_out_of_history_are_announced_and_judged_real(
    storm_reports: dict[str, Run],
) -> None:
    """History of 3 publications, 5 a second per channel, clients away 0.25-0.75 s:
    many resume from beyond history. Each is told ``recovered: false``, and what it
    skipped is counted as announced, never as lost; no gap is needless."""
    report = report_of(storm_reports, "storm-history")
    storm = check_storm(report)
    assert report["config"]["history_size"] == 3
    gaps = storm["gaps_announced"]
    assert gaps["by_reason"].get("history", 0) == storm["recovered"].get("false", 0) > 0
    assert gaps["judged"].get("real", 0) > 0
    assert report["deliveries"]["announced_gaps_missed"] > 0


def test_storm_redis_restart_announces_every_lost_history(storm_reports: dict[str, Run]) -> None:
    """Redis restarted empty: every client learns of the new epoch (a push in it, or a
    resume answered ``recovered: false``), and nothing is skipped without that."""
    report = report_of(storm_reports, "storm-redis-restart")
    storm = check_storm(report)
    gaps = storm["gaps_announced"]
    assert gaps["by_reason"].get("epoch", 0) >= 30
    assert sum(gaps["judged"].values()) > 0


def test_hooks_connects_count_every_hook_call(hook_reports: dict[str, Run]) -> None:
    """Every client subscribed through each gateway, and the hook calls the gateway
    counted, the backend served and the clients made agree."""
    report = report_of(hook_reports, "hooks-connects")
    assert report["scenario"] == "hooks"
    assert report["publishes"] == []
    connects = {run["variant"]: run for run in report["connects"]}
    assert list(connects) == ["none", "connect", "subscribe"]
    for variant, run in connects.items():
        assert "skipped" not in run, run.get("skipped")
        assert (run["clients"], run["subscribed"], run["failed"]) == (20, 20, 0)
        assert run["latency_ms"]["count"] == 20
        assert run["connects_per_s"] > 0 and run["server_cpu_us_per_connect"] > 0
        hook = run["hook"]
        if variant == "none":
            assert hook["calls"] == 0 and run["backend"]["requests"] == {}
            assert run["latency_minus_hook_ms"] is None
        else:
            assert hook["name"] == variant
            assert hook["calls"] == run["backend"]["requests"][f"/{variant}"] == 20
            assert hook["outcomes"] == {"allow": 20}
            assert hook["mean_ms"] > 0
            assert set(run["latency_minus_hook_ms"]) == {"mean", "p50", "p99"}
    summary = report["summary"]["connects"]
    assert set(summary) == {"none", "connect", "subscribe"}
    assert summary["connect"]["runs"] == summary["subscribe"]["runs"] == 1
    assert set(summary["subscribe"]["vs_none"]) == {
        "extra_server_cpu_us",
        "extra_latency_mean_ms",
        "rate_ratio",
    }
    plot = Path(report["files"]["plot"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_hooks_publishes_answer_every_command_and_count_hook_calls(
    hook_reports: dict[str, Run],
) -> None:
    """Every publish sent is acknowledged and published once; the hook is called for
    each one to the matching channel and never for the other."""
    report = report_of(hook_reports, "hooks-publishes")
    assert report["connects"] == []
    publishes = {run["variant"]: run for run in report["publishes"]}
    assert list(publishes) == ["plain", "hooked"]
    for variant, run in publishes.items():
        assert (run["publishers"], run["connected"], run["window"]) == (2, 2, 2)
        assert run["sent"] == run["acked"] > 0
        assert (run["refused"], run["unanswered"]) == ({}, 0)
        assert run["published"] == run["acked"] == run["latency_ms"]["count"]
        assert run["publishes_per_s"] > 0 and run["server_cpu_us_per_publish"] > 0
        hook = run["hook"]
        if variant == "plain":
            assert hook["calls"] == 0 and run["backend"]["requests"] == {}
        else:
            assert hook["calls"] == run["backend"]["requests"]["/publish"] == run["acked"]
            assert hook["outcomes"] == {"accept": run["acked"]}
    assert set(report["summary"]["publishes"]) == {"plain", "hooked"}
    assert report["files"]["plot"] is None


@pytest.mark.parametrize("name", BASELINES)
def test_baseline_fanout(reports: dict[str, Run], name: str) -> None:
    report = report_of(reports, f"baseline-{name}")
    assert report["target"]["name"] == name
    assert report["target"]["publish_via"] == "redis"
    check_deliveries(report, 10, [10])


def test_nchan_is_installed() -> None:
    """The nchan target needs nginx and its nchan module: missing, the suite fails here
    saying what to install, rather than skipping the Nchan runs."""
    try:
        require_nchan()
    except NchanMissing as exc:
        pytest.fail(str(exc))


@pytest.mark.parametrize("transport", ["ws", "sse"])
def test_nchan_fanout(reports: dict[str, Run], transport: str) -> None:
    """Nchan over both transports: every step delivered everything, published by HTTP
    POST through the second nginx (a load-generator process of the run)."""
    test_nchan_is_installed()
    report = report_of(reports, f"nchan-{transport}")
    assert report["target"]["name"] == "nchan"
    assert report["target"]["transport"] == transport
    assert report["target"]["publish_via"] == "nchan-http"
    check_deliveries(report, 20, [5, 10])
    if transport == "ws":
        check_arrivals(report)
    assert all("nginx-publisher" in s["loadgen"]["cpu_percent"] for s in report["steps"])
    assert report["publisher"]["errors"] == {}


def compare_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_compare_parser(parser.add_subparsers())
    return parser.parse_args(["compare", *argv])


def test_compare_light_section_runs_every_server_on_its_transports() -> None:
    args = compare_args(
        "--sections", "light", "--targets", "gateway,nchan,websockets_broadcast,sse_starlette",
        "--light-clients", "50", "--light-sse-clients", "30",
    )  # fmt: skip
    planned = [(r["target"], r["transport"], r["clients"], r["rates"]) for r in plan(args)]
    assert planned == [
        ("gateway", "sse", 30, [10.0, 30.0]),
        ("gateway", "ws", 50, [2.0, 10.0]),
        ("nchan", "sse", 30, [10.0, 30.0]),
        ("nchan", "ws", 50, [2.0, 10.0]),
        ("websockets_broadcast", "ws", 50, [2.0, 10.0]),
        ("sse_starlette", "sse", 30, [10.0, 30.0]),
    ]


def light_row(
    target: str,
    transport: str,
    latencies: dict[float, tuple[float, float]],
    arrivals: dict[float, tuple[float, float]] | None = None,
) -> Any:
    steps = [
        {"rate": rate, "lost": 0, "server": {"cpu_percent": 1.0},
         "loadgen": {"cpu_percent_total": 2.0},
         "latency_ms": {"p50": p50, "p95": p99, "p99": p99, "max": p99}}
        for rate, (p50, p99) in latencies.items()
    ]  # fmt: skip
    for step in steps if arrivals else []:
        p50, p99 = arrivals[step["rate"]]  # type: ignore[index]
        step["arrival_latency_ms"] = {"p50": p50, "p95": p99, "p99": p99, "max": p99}
    clients = 5000 if transport == "ws" else 2000
    return {"section": "light", "target": target, "transport": transport,
            "clients": clients, "report": {"steps": steps}}  # fmt: skip


def test_light_table_and_targets_hold_the_gateway_against_nchan() -> None:
    """A line per light step; p50 and p99 at 10 pub/s over WebSocket and p99 on every SSE
    step both ran, against Nchan's."""
    rows = [
        light_row("gateway", "ws", {2.0: (1, 2), 10.0: (20.0, 50.0)}),
        light_row("gateway", "sse", {10.0: (5, 10), 30.0: (9, 30.0)}),
        light_row("nchan", "ws", {2.0: (9, 9), 10.0: (29.0, 58.0)}),
        light_row("nchan", "sse", {10.0: (5, 12), 30.0: (15, 28.0)}),
    ]
    table = light_table(rows)
    assert len(table) == 2 + 8
    assert table[3] == (
        "| gateway (ws) | 5,000 | 10 | 20.0 | 50.0 | 50.0 | 50.0 | - | 0 | 1.0 | 2.0 |"
    )
    ws, sse = light_vs_nchan(rows)
    assert ws.startswith("| light 10 pub/s x 5,000 WS: gateway p50 and p99 ≤ Nchan's |")
    assert "gateway p50 20.0 / p99 50.0 ms, Nchan p50 29.0 / p99 58.0 ms | met |" in ws
    assert "10/s: gateway 10.0 vs Nchan 12.0 ms; 30/s: gateway 30.0 vs Nchan 28.0 ms" in sse
    assert sse.endswith("| **missed** |")
    assert light_vs_nchan(rows[:2]) == [
        "| light 10 pub/s WS: gateway p50 and p99 ≤ Nchan's | "
        "not measured (needs both in the light section) | - |",
        "| light SSE steps: gateway p99 ≤ Nchan's | "
        "not measured (needs both in the light section) | - |",
    ]


def test_light_steps_are_judged_also_at_arrival_when_the_clients_stamped_them() -> None:
    """Clients reading with the kernel's receive times (every light run of ``compare``):
    the table has each step's latency at arrival beside the read one, and the targets
    are judged by both."""
    rows = [
        light_row("gateway", "ws", {10.0: (30.0, 60.0)}, {10.0: (10.0, 20.0)}),
        light_row("gateway", "sse", {10.0: (9.0, 19.0)}, {10.0: (5.0, 9.5)}),
        light_row("nchan", "ws", {10.0: (29.0, 58.0)}, {10.0: (11.0, 21.0)}),
        light_row("nchan", "sse", {10.0: (8.0, 18.0)}, {10.0: (5.0, 9.0)}),
    ]
    assert light_table(rows)[2] == (
        "| gateway (ws) | 5,000 | 10 | 30.0 | 60.0 | 60.0 | 60.0 | 10.0 / 20.0 | 0 | 1.0 | 2.0 |"
    )
    ws, sse, ws_arrival, sse_arrival = light_vs_nchan(rows)
    assert ws.endswith("| **missed** |") and sse.endswith("| **missed** |")
    assert ws_arrival.startswith(
        "| light 10 pub/s x 5,000 WS, at arrival: gateway p50 and p99 ≤ Nchan's | "
        "gateway p50 10.0 / p99 20.0 ms, Nchan p50 11.0 / p99 21.0 ms | met |"
    )
    assert sse_arrival.startswith("| light SSE steps (2,000 streams), at arrival: gateway p99")
    assert sse_arrival.endswith("| **missed** |")  # 9.5 against 9.0
    del rows[2]["report"]["steps"][0]["arrival_latency_ms"]  # one run read without stamps
    assert len(light_vs_nchan(rows)) == 2


def test_compare_reads_the_light_steps_with_kernel_stamps_and_the_others_without() -> None:
    args = compare_args("--targets", "gateway,nchan")
    runs = plan(args)
    assert {r["section"] for r in runs} == {"fanout-ws", "fanout-sse", "idle", "light"}
    for run in runs:
        assert setup_of(args, run).kernel_stamps == (run["section"] == "light")


def test_compare_rounds_alternate_the_servers_of_the_light_section() -> None:
    """``--rounds 3``: the light runs three times, A B, B A, A B; other sections once."""
    args = compare_args(
        "--sections", "idle,light", "--targets", "gateway,nchan", "--rounds", "3",
        "--light-sse-clients", "0",
    )  # fmt: skip
    planned = [(r["section"], r["target"], r["transport"], r.get("round")) for r in plan(args)]
    assert planned == [
        ("idle", "gateway", "sse", None),
        ("idle", "gateway", "ws", None),
        ("idle", "nchan", "sse", None),
        ("idle", "nchan", "ws", None),
        ("light", "gateway", "ws", 1),
        ("light", "nchan", "ws", 1),
        ("light", "nchan", "ws", 2),
        ("light", "gateway", "ws", 2),
        ("light", "gateway", "ws", 3),
        ("light", "nchan", "ws", 3),
    ]


def test_light_targets_are_judged_round_by_round() -> None:
    """Each round's gateway against the same round's Nchan, then how many rounds met."""
    rounds = [
        (1, (20.0, 50.0), (29.0, 58.0)),  # met
        (2, (30.0, 50.0), (29.0, 58.0)),  # p50 above Nchan's
    ]
    rows = [
        {**light_row(target, "ws", {10.0: latency}), "round": number}
        for number, gateway, nchan in rounds
        for target, latency in (("gateway", gateway), ("nchan", nchan))
    ]
    assert light_table(rows)[2].startswith("| gateway (ws), round 1 | 5,000 | 10 | 20.0 |")
    first, second, summary = light_vs_nchan(rows)
    assert first.startswith("| light 10 pub/s x 5,000 WS: gateway p50 and p99 ≤ Nchan's, round 1")
    assert first.endswith("| met |") and second.endswith("| **missed** |")
    assert summary == (
        "| light 10 pub/s x 5,000 WS: gateway p50 and p99 ≤ Nchan's: rounds met | 1 of 2 | "
        "**missed** |"
    )


def loadtest_json(argv: list[str]) -> Any:
    """``python -m loadtest ARGV`` (with ``--json``): its report."""
    done = subprocess.run(
        [sys.executable, "-m", "loadtest", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=True,
    )
    return json.loads(done.stdout)


def test_sendfloor_times_one_send_per_connection() -> None:
    argv = ["sendfloor", "--clients", "20", "--rounds", "3", "--rate", "0", "--json"]
    report = loadtest_json([*argv, "--sender-cpus", "", "--receiver-cpus", ""])
    assert (report["clients"], report["rounds"], report["payload_bytes"]) == (20, 3, 100)
    wall, cpu = report["wall_us_per_send"], report["cpu_us_per_send"]
    assert 0 < wall["median"] <= wall["max"]
    assert 0 < cpu["median"] <= cpu["max"]
    # The median connection's send returns within the round: at most 20 sends' time.
    assert 0 < report["median_subscriber_ms"]["median"] <= wall["max"] * 20 / 1000
    # Every round's time, and the first rounds' median (fewer rounds than the warm-up's).
    assert len(report["round_ms"]) == 3 and all(ms > 0 for ms in report["round_ms"])
    assert report["first_rounds_ms"] == pytest.approx(sorted(report["round_ms"])[1], abs=0.01)
    assert report["later_rounds_ms"] is None


@pytest.mark.parametrize(
    ("transport", "extra"),
    [("ws", []), ("sse", []), ("ws", ["--distinct-channels", "--presence"])],
)
def test_arrival_subscribes_every_client_arriving_at_once(transport: str, extra: list[str]) -> None:
    argv = ["arrival", "--clients", "40", "--transport", transport, "--backlogs", "64,128"]
    report = loadtest_json([*argv, *extra, "--server-cpus", "", "--loadgen-cpus", "", "--json"])
    assert (report["clients"], report["transport"]) == (40, transport)
    assert report["presence"] == ("--presence" in extra)
    assert [run["backlog"] for run in report["runs"]] == [64, 128]
    for run in report["runs"]:
        assert run["subscribed"] == 40, run
        assert isinstance(run["syns_dropped"], int) and run["syns_dropped"] >= 0
        ms = run["subscribed_ms"]
        assert 0 < ms["p50"] <= ms["p95"] <= ms["p99"] <= ms["max"]


def test_hotpath_times_the_gateways_own_work_per_delivery() -> None:
    report = loadtest_json(["hotpath", "--sessions", "20", "--publications", "10", "--json"])
    assert (report["sessions"], report["publications"]) == (20, 10)
    costs = report["ns_per_delivery"]
    assert set(costs) == {"websocket", "sse", "sse-2-channels"}
    assert all(isinstance(ns, int) and ns > 0 for ns in costs.values())


@pytest.mark.parametrize("recover", [0, 3])
def test_connectpath_times_the_gateways_own_work_per_connection(recover: int) -> None:
    args = ["connectpath", "--cycles", "200", "--rounds", "1", "--recover", str(recover)]
    report = loadtest_json([*args, "--json"])
    assert (report["cycles"], report["rounds"], report["recover"]) == (200, 1, recover)
    ws, sse = report["us_per_connection"]["ws"], report["us_per_connection"]["sse"]
    assert list(ws) == ["made", "request_to_101", "subscribe", "close", "total"]
    assert list(sse) == ["made", "request_to_stream", "close", "total"]
    for stages in (ws, sse):
        assert all(us > 0 for us in stages.values()), stages
        parts = sum(us for stage, us in stages.items() if stage != "total")
        assert abs(stages["total"] - parts) < 0.1, stages


def test_connectpath_refuses_to_time_an_error_path() -> None:
    from loadtest.connectpath import _check_sse, _check_ws

    switching = b"HTTP/1.1 101 Switching Protocols\r\n\r\n"
    reply = b'\x81\x20{"id":1,"ok":true,"result":{}}'
    _check_ws([switching, reply])
    with pytest.raises(RuntimeError, match="upgrade was not accepted"):
        _check_ws([b"HTTP/1.1 403 Forbidden\r\n\r\n"])
    with pytest.raises(RuntimeError, match="not answered ok"):
        _check_ws([switching, b'\x81\x30{"id":1,"ok":false,"error":{"code":"forbidden"}}'])
    _check_sse([b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n"])
    with pytest.raises(RuntimeError, match="did not open"):
        _check_sse([b"HTTP/1.1 401 Unauthorized\r\n\r\n"])
    event = b'data: {"channel": "bench", "offset": 1}\n\n'
    opened = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n"
    _check_sse([opened, event * 2], recovered=2)
    with pytest.raises(RuntimeError, match="2 publications were not recovered"):
        _check_sse([opened, event], recovered=2)
    told = b'\x81\x30{"id":1,"ok":true,"result":{"recovered":true}}'
    _check_ws([switching, told, event], recovered=1)
    with pytest.raises(RuntimeError, match="not recovered"):
        _check_ws([switching, told.replace(b"true}", b"false}"), event], recovered=1)


def test_the_load_generators_sse_client_decodes_the_body_however_it_is_split() -> None:
    """A chunked body (extensions and the last chunk included) and one that ends with the
    connection, as Nchan's: the body the client reads is the same for every way of
    cutting the response into reads, and a chunked stream's end is seen."""
    import random

    import httptools

    from loadtest.clients.sse import SseClient

    class Collecting(SseClient):
        def __init__(self) -> None:  # only what the parser's callbacks use
            self.failed = self.ended = False
            self.parser = httptools.HttpResponseParser(self)
            self.dialect = type("Dialect", (), {"ready_on_open": False})()
            self.body: list[bytes] = []

        def _feed(self, data: bytes) -> None:
            self.body.append(data)

        def _end_of_stream(self) -> None:
            self.ended = True

    rng = random.Random(16)
    bodies = [bytes([97 + rng.randrange(26)]) * rng.randrange(1, 300) for _ in range(40)]
    chunks = [
        b"%x%s\r\n%s\r\n" % (len(b), b";ext=1" if i % 7 == 3 else b"", b)
        for i, b in enumerate(bodies)
    ]
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
    chunked = b"transfer-encoding: chunked\r\n\r\n" + b"".join(chunks) + b"0\r\n\r\n"
    responses = {
        "chunked": head + chunked,
        "until-close": head + b"connection: close\r\n\r\n" + b"".join(bodies),
    }
    for framing, response in responses.items():
        for _ in range(100):
            client = Collecting()
            cuts = sorted(rng.sample(range(1, len(response)), rng.randrange(0, 30)))
            for a, b in zip([0, *cuts], [*cuts, len(response)], strict=True):
                client.data_received(response[a:b])
            assert not client.failed, framing
            assert b"".join(client.body) == b"".join(bodies), framing
            assert client.ended == (framing == "chunked"), framing


def test_the_load_generators_sse_client_fails_a_refused_or_broken_response() -> None:
    import httptools

    from loadtest.clients.sse import SseClient

    class Failing(SseClient):
        def __init__(self) -> None:
            self.failed = False
            self.parser = httptools.HttpResponseParser(self)
            self.dialect = type("Dialect", (), {"ready_on_open": True})()
            self.reasons: list[str] = []
            self.body: list[bytes] = []

        def _fail(self, reason: str) -> None:
            self.failed = True
            self.reasons.append(reason)

        def _feed(self, data: bytes) -> None:
            self.body.append(data)

        def _end_of_stream(self) -> None: ...

    refused = Failing()
    refused.data_received(b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 2\r\n\r\n{}")
    assert refused.reasons == ["HTTP 401"] and refused.body == []
    broken = Failing()
    broken.data_received(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n")
    assert len(broken.reasons) == 1 and broken.reasons[0].startswith("bad response")
