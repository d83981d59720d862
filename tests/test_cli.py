"""``python -m gateway`` as a user runs it: dev mode, production refusal, workers, SIGTERM drain,
and no token in any log line."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.conftest import SECRET, eventually, token
from tests.helpers import sample_value
from tests.procs import ROOT, GatewayProcess
from tests.redis_server import RedisServer

JWT = re.compile(r"^(eyJ[\w-]+\.[\w-]+\.[\w-]+)$", re.M)


@pytest.fixture
async def procs() -> AsyncIterator[list[GatewayProcess]]:
    started: list[GatewayProcess] = []
    yield started
    for proc in started:
        proc.stop()


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


async def test_dev_mode_prints_a_working_token_and_serves_the_demo(
    procs: list[GatewayProcess],
) -> None:
    proc = GatewayProcess()
    procs.append(proc)
    await proc.wait_ready()
    dev_token = JWT.search(proc.output())
    assert dev_token, proc.output()
    assert "dev mode" in proc.output().lower()
    async with httpx.AsyncClient(base_url=proc.url) as client:
        for page in ("/", "/chat"):
            response = await client.get(page)
            assert response.status_code == 200 and "<html" in response.text.lower()
        minted = (await client.get("/dev/token", params={"user": "zoe"})).json()
        assert minted["user"] == "zoe"
    async with connect(f"{proc.ws_url}/ws?token={dev_token.group(1)}") as ws:
        await ws.send('{"id": 1, "op": "subscribe", "channel": "demo:ticker"}')
        reply = orjson.loads(await asyncio.wait_for(ws.recv(), 5))
        assert reply["ok"] is True
        push = orjson.loads(await asyncio.wait_for(ws.recv(), 5))  # the demo publisher
        assert push["channel"] == "demo:ticker" and set(push["data"]) == {"symbol", "price", "ts"}


async def test_dev_mode_with_workers_warns_once_and_its_token_works_on_each(
    procs: list[GatewayProcess], redis_server: RedisServer, redis_prefix: str
) -> None:
    """The workers are given the parent's ephemeral secret, so they are not in dev mode
    themselves: the parent says so (once), and its banner says whether a demo runs."""
    env = {
        "GATEWAY_BROKER_URL": redis_server.url,
        "GATEWAY_BROKER_PREFIX": redis_prefix,
        "GATEWAY_DEMO": "false",
    }
    proc = GatewayProcess(env, args=["--workers", "2"])
    procs.append(proc)
    await proc.wait_ready()
    output = proc.output()
    assert output.count("Never run this in production") == 1, output
    assert "demo publisher off" in output
    dev_token = JWT.search(output)
    assert dev_token, output
    for _ in range(6):  # whichever worker the kernel hands each to
        async with connect(f"{proc.ws_url}/ws?token={dev_token.group(1)}") as ws:
            await ws.send('{"id": 1, "op": "ping"}')
            assert orjson.loads(await asyncio.wait_for(ws.recv(), 5))["ok"] is True


def test_production_without_a_key_refuses_to_start() -> None:
    result = run_cli({"GATEWAY_ENV": "production"}, "--port", "1")
    assert result.returncode != 0
    assert "GATEWAY_JWT_SECRET" in result.stderr


def test_several_workers_with_the_memory_broker_are_refused_with_a_reason() -> None:
    result = run_cli({"GATEWAY_JWT_SECRET": SECRET}, "--workers", "2", "--port", "1")
    assert result.returncode == 2
    assert "memory://" in result.stderr and "redis://" in result.stderr


async def test_sigterm_closes_websockets_with_1012_ends_sse_and_exits(
    procs: list[GatewayProcess],
) -> None:
    proc = GatewayProcess({"GATEWAY_JWT_SECRET": SECRET, "GATEWAY_DRAIN_SECONDS": "5"})
    procs.append(proc)
    await proc.wait_ready()
    async with (
        connect(f"{proc.ws_url}/ws?token={token()}") as ws,
        httpx.AsyncClient(timeout=10) as client,
        client.stream("GET", f"{proc.url}/sse?channel=news&token={token()}") as stream,
    ):
        await ws.send('{"id": 1, "op": "subscribe", "channel": "news"}')
        assert orjson.loads(await ws.recv())["ok"] is True
        lines = stream.aiter_lines()
        assert (await anext(lines)).startswith("retry:")
        proc.proc.send_signal(signal.SIGTERM)
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 10)
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1012, "service restart")

        async def drain_sse() -> None:
            async for _ in lines:
                pass

        await asyncio.wait_for(drain_sse(), 10)  # the stream ends
    # uvicorn re-raises the captured SIGTERM once shut down, as a service manager expects.
    assert await proc.wait_exit(10) in (0, -signal.SIGTERM)


async def test_tokens_never_appear_in_logs(procs: list[GatewayProcess]) -> None:
    proc = GatewayProcess({"GATEWAY_JWT_SECRET": SECRET, "GATEWAY_LOG_LEVEL": "debug"})
    procs.append(proc)
    await proc.wait_ready()
    secret_tokens = [token("logcheck") for _ in range(4)]
    async with connect(f"{proc.ws_url}/ws?token={secret_tokens[0]}") as ws:
        await ws.send(orjson.dumps({"id": 1, "op": "refresh", "token": secret_tokens[1]}).decode())
        await ws.recv()
    async with httpx.AsyncClient(base_url=proc.url, timeout=5) as client:
        async with client.stream("GET", f"/sse?channel=x&token={secret_tokens[2]}") as stream:
            await anext(stream.aiter_lines())
        await client.post(
            "/api/publish",
            json={"channel": "x", "data": 1},
            headers={"Authorization": f"Bearer {secret_tokens[3]}"},
        )
        await client.get("/api/channels/bad channel/history", params={"token": secret_tokens[3]})
        await client.get("/sse?channel=x&token=not-a-valid-token-but-secret")
    await eventually(lambda: "/api/channels/" in proc.output())
    output = proc.output()
    assert "GET /sse?channel=x&token=[redacted]" in output
    assert '"WebSocket /ws?token=[redacted]" [accepted]' in output  # answered below ASGI
    # with the client's address, as uvicorn writes it (asked of the socket for this line)
    assert re.search(r'127\.0\.0\.1:\d+ - "WebSocket /ws\?token=\[redacted\]" \[accepted\]', output)
    for tok in [*secret_tokens, "not-a-valid-token-but-secret"]:
        assert tok not in output


async def test_without_the_access_log_no_line_per_request_or_websocket(
    procs: list[GatewayProcess],
) -> None:
    proc = GatewayProcess({"GATEWAY_JWT_SECRET": SECRET, "GATEWAY_ACCESS_LOG": "false"})
    procs.append(proc)
    await proc.wait_ready()
    async with connect(f"{proc.ws_url}/ws?token={token('quiet')}") as ws:
        await ws.send(orjson.dumps({"id": 1, "op": "unknown"}).decode())
        assert orjson.loads(await ws.recv())["ok"] is False
        async with httpx.AsyncClient(base_url=proc.url, timeout=5) as client:
            assert (await client.get("/healthz")).status_code == 200
    output = proc.output()
    assert "Application startup complete" in output  # the log is there, and quiet
    assert "[accepted]" not in output and "GET /healthz" not in output


def worker_pids(parent: int) -> list[int]:
    """The supervisor's worker children (not multiprocessing's resource tracker)."""
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    pids = []
    for pid in map(int, children):
        with contextlib.suppress(FileNotFoundError):
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(pid)
    return pids


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def redis_env(redis_server: RedisServer, redis_prefix: str) -> dict[str, str]:
    return {
        "GATEWAY_JWT_SECRET": SECRET,
        "GATEWAY_BROKER_URL": redis_server.url,
        "GATEWAY_BROKER_PREFIX": redis_prefix,
    }


async def close_of(client: Any) -> tuple[int, str] | None:
    """Read until the server closes: its close frame's code and reason (None: no frame)."""
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            await asyncio.wait_for(client.recv(), 10)
    rcvd = closed.value.rcvd
    return None if rcvd is None else (rcvd.code, rcvd.reason)


async def start_workers(
    procs: list[GatewayProcess], redis_server: RedisServer, redis_prefix: str
) -> tuple[GatewayProcess, list[int]]:
    env = {**redis_env(redis_server, redis_prefix), "GATEWAY_DRAIN_SECONDS": "5"}
    proc = GatewayProcess(env, args=["--workers", "2"])
    procs.append(proc)
    await proc.wait_ready()
    pids = await eventually(lambda: len(worker_pids(proc.proc.pid)) == 2, timeout=10)
    assert pids
    return proc, worker_pids(proc.proc.pid)


async def test_two_workers_with_redis_serve_one_port_and_each_drains_on_sigterm(
    procs: list[GatewayProcess], redis_server: RedisServer, redis_prefix: str
) -> None:
    proc, workers = await start_workers(procs, redis_server, redis_prefix)
    url = f"{proc.ws_url}/ws?token={token()}"
    async with contextlib.AsyncExitStack() as stack:
        # Several connections (which worker accepts each is up to the kernel).
        clients = [await stack.enter_async_context(connect(url)) for _ in range(6)]
        for client in clients:
            await client.send('{"id": 1, "op": "subscribe", "channel": "news"}')
            assert orjson.loads(await asyncio.wait_for(client.recv(), 5))["ok"] is True
        await clients[0].send('{"id": 2, "op": "publish", "channel": "news", "data": "hi"}')
        for client in clients:  # the publisher's reply may come first on its connection
            frame = orjson.loads(await asyncio.wait_for(client.recv(), 5))
            if "ok" in frame:
                frame = orjson.loads(await asyncio.wait_for(client.recv(), 5))
            assert (frame["channel"], frame["offset"], frame["data"]) == ("news", 1, "hi")

        proc.proc.send_signal(signal.SIGTERM)
        for client in clients:
            assert await close_of(client) == (1012, "service restart")
    assert await proc.wait_exit(15) == 0
    assert not any(running(pid) for pid in workers)


def figures_files(pid: int) -> list[Path]:
    """Worker ``pid``'s figures file, if it has one (``gateway.metrics_shared``)."""
    return list(Path(tempfile.gettempdir()).glob(f"gateway-metrics-*/worker-{pid}.json"))


def figures_file(pid: int) -> bool:
    """Whether worker ``pid`` has its figures file."""
    return len(figures_files(pid)) == 1


async def test_two_workers_answer_metrics_for_the_whole_process(
    procs: list[GatewayProcess], redis_server: RedisServer, redis_prefix: str
) -> None:
    """A scrape reaches whichever worker takes its connection: each answered with its own
    figures (9 connections from one, 1 from the other, counters going back and forth,
    which Prometheus reads as resets). Every scrape answers for both now: each worker
    writes its figures to a file of the run's directory, and a scrape sums the files.
    (Which worker accepts a connection, a client's or a scrape's, is the kernel's to
    choose; the files show both are in every answer whatever it chose.)"""
    proc, workers = await start_workers(procs, redis_server, redis_prefix)
    # (each worker writes its file as it starts; the one not asked /readyz may be later)
    await eventually(lambda: all(figures_file(pid) for pid in workers), timeout=10)
    url = f"{proc.ws_url}/ws?token={token()}"
    async with contextlib.AsyncExitStack() as stack:
        clients: list[ClientConnection] = []
        for _ in range(8):
            client = await stack.enter_async_context(connect(url))
            await client.send('{"id": 1, "op": "subscribe", "channel": "news"}')
            assert orjson.loads(await asyncio.wait_for(client.recv(), 5))["ok"] is True
            clients.append(client)
        await clients[0].send('{"id": 2, "op": "publish", "channel": "news", "data": "hi"}')
        for client in clients:
            while "channel" not in orjson.loads(await asyncio.wait_for(client.recv(), 5)):
                pass  # the publisher's reply

        async def scrape() -> str:
            async with httpx.AsyncClient(base_url=proc.url, timeout=5) as fresh:
                return (await fresh.get("/metrics")).text

        open_ws = 'gateway_connections{transport="websocket"}'

        # The other worker's figures are at most a second old.
        async def summed() -> bool:
            text = await scrape()
            return sample_value(text, open_ws) == len(clients) and sample_value(
                text, "gateway_deliveries_total"
            ) == len(clients)

        deadline = asyncio.get_running_loop().time() + 5
        while not await summed():
            assert asyncio.get_running_loop().time() < deadline, await scrape()
            await asyncio.sleep(0.1)
        for _ in range(10):  # fresh connections: either worker answers each
            text = await scrape()
            assert sample_value(text, open_ws) == len(clients), text
            assert sample_value(text, "gateway_deliveries_total") == len(clients), text
            assert sample_value(text, "gateway_publications_total") == 1, text
            # a process's descriptors are summed, its limit not
            assert sample_value(text, "process_open_fds") > len(clients), text
            assert sample_value(text, "process_max_fds") == os.sysconf("SC_OPEN_MAX"), text


async def test_workers_of_a_killed_supervisor_close_with_1012_and_leave_no_files(
    procs: list[GatewayProcess], redis_server: RedisServer, redis_prefix: str
) -> None:
    """A supervisor killed with SIGKILL cannot stop its workers nor remove the run's
    figures directory: each worker sees it gone (its watchdog), drains (a client gets
    1012) and exits, and the last one out removes the directory."""
    proc, workers = await start_workers(procs, redis_server, redis_prefix)
    await eventually(lambda: all(figures_file(pid) for pid in workers), timeout=10)
    (directory,) = {path.parent for pid in workers for path in figures_files(pid)}
    async with connect(f"{proc.ws_url}/ws?token={token()}") as client:
        await client.send('{"id": 1, "op": "subscribe", "channel": "news"}')
        assert orjson.loads(await asyncio.wait_for(client.recv(), 5))["ok"] is True
        proc.proc.send_signal(signal.SIGKILL)
        assert await close_of(client) == (1012, "service restart")
    assert await eventually(lambda: not any(running(pid) for pid in workers), timeout=15)
    assert not directory.exists(), sorted(directory.iterdir())


async def test_a_drain_on_a_presence_channel_closes_with_1012_and_leaves_presence_empty(
    procs: list[GatewayProcess], redis_server: RedisServer, redis_prefix: str
) -> None:
    """A presence channel's leave is a Redis call: the drain waits for every session
    still leaving, so each gets its 1012 ``service restart`` (not the server's bare 1012
    after the drain) and no entry outlives the workers (until the presence TTL)."""
    proc, _ = await start_workers(procs, redis_server, redis_prefix)
    url = f"{proc.ws_url}/ws?token={token()}"
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(connect(url)) for _ in range(6)]
        for client in clients:
            await client.send('{"id": 1, "op": "subscribe", "channel": "chat:drain"}')
            while "ok" not in (frame := orjson.loads(await asyncio.wait_for(client.recv(), 5))):
                pass  # the others' joins
            assert frame["ok"] is True
        proc.proc.send_signal(signal.SIGTERM)
        for client in clients:
            assert await close_of(client) == (1012, "service restart")
    assert await proc.wait_exit(15) == 0
    after = GatewayProcess(redis_env(redis_server, redis_prefix))
    procs.append(after)
    await after.wait_ready()
    async with httpx.AsyncClient(base_url=after.url, timeout=5) as http:
        headers = {"Authorization": f"Bearer {token()}"}
        r = await http.get("/api/channels/chat:drain/presence", headers=headers)
    assert r.json() == {"clients": []}


async def test_a_worker_that_dies_unasked_stops_the_group_with_an_error(
    procs: list[GatewayProcess], redis_server: RedisServer, redis_prefix: str
) -> None:
    proc, workers = await start_workers(procs, redis_server, redis_prefix)
    os.kill(workers[0], signal.SIGKILL)
    assert await proc.wait_exit(15) == 1
    assert not any(running(pid) for pid in workers)
    assert "exited unasked" in proc.output()
