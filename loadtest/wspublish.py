"""WebSocket publishers: ``publish`` commands as fast as the gateway acknowledges them.

A process of its own (pinned to the load-generator CPUs) opens ``publishers`` picows
connections; on a go from the coordinator each one keeps ``window`` ``publish``
commands in flight, sending the next as soon as one is acknowledged, for ``duration``
seconds, then waits for the acknowledgements still due. The gateway runs one
connection's commands one at a time, so ``publishers`` is the number of publishes
the gateway works on at once, and a window above 1 only queues commands behind them.

Reported: commands sent, acknowledged (``ok``), refused (by error code), still
unanswered when the wait ended, and the acknowledgement latency (from the send to the
reply, one histogram for all connections).

The pipe protocol, child to coordinator: ``("ready", connected, failures)``, then
``("progress", acknowledged)`` every ``PROGRESS_INTERVAL`` while publishing and
``("done", figures)``; coordinator to child: ``("go",)`` after ``ready`` and
``("close",)`` after ``done`` (the connections stay open until then, so that closing
them is not in the coordinator's measurement of the server's CPU).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import Counter
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any
from urllib.parse import quote

import orjson
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from loadtest.histogram import Histogram

PROGRESS_INTERVAL = 0.5
ANSWER_WAIT = 10.0
TEXT = WSMsgType.TEXT


@dataclass
class PublishPlan:
    host: str
    port: int
    token: str
    channel: str
    publishers: int
    window: int
    duration: float
    pad_bytes: int = 64
    connect_timeout: float = 15.0
    cpus: list[int] | None = None


class Tally:
    """What every connection of the process adds to."""

    def __init__(self, duration: float) -> None:
        self.duration = duration
        self.running = False
        self.deadline = 0.0
        self.sent = 0
        self.acked = 0
        self.refused: Counter[str] = Counter()
        self.latency = Histogram()
        self.first_send = 0.0
        self.last_answer = 0.0
        self.outstanding = 0
        self.all_answered: asyncio.Event | None = None


class PublishingClient(WSListener):
    def __init__(self, tally: Tally, channel: str, pad: str, window: int) -> None:
        super().__init__()
        self.tally = tally
        self.channel = channel
        self.pad = pad
        self.window = window
        self.transport: WSTransport | None = None
        self.next_id = 0
        self.sent_at: dict[int, float] = {}
        self.disconnected = False

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def start(self) -> None:
        for _ in range(self.window):
            self.send_one()

    def send_one(self) -> None:
        tally = self.tally
        transport = self.transport
        if transport is None or self.disconnected:
            return
        self.next_id += 1
        command = {
            "id": self.next_id,
            "op": "publish",
            "channel": self.channel,
            "data": {"n": self.next_id, "t": time.time(), "pad": self.pad},
        }
        now = time.perf_counter()
        self.sent_at[self.next_id] = now
        if not tally.first_send:
            tally.first_send = now
        tally.sent += 1
        tally.outstanding += 1
        transport.send(TEXT, orjson.dumps(command))

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()
            return
        if frame.msg_type != TEXT:
            return
        message = orjson.loads(frame.get_payload_as_bytes())
        sent = self.sent_at.pop(message.get("id"), None)
        if sent is None:
            return  # not an answer to a publish of ours
        now = time.perf_counter()
        tally = self.tally
        tally.outstanding -= 1
        tally.last_answer = now
        tally.latency.record_us(int((now - sent) * 1e6))
        if message.get("ok"):
            tally.acked += 1
        else:
            error = message.get("error") or {}
            tally.refused[str(error.get("code", "?"))] += 1
        if tally.running and now < tally.deadline:
            self.send_one()
        elif tally.outstanding <= 0 and tally.all_answered is not None:
            tally.all_answered.set()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.disconnected = True
        tally = self.tally
        tally.outstanding -= len(self.sent_at)
        self.sent_at.clear()
        if tally.outstanding <= 0 and tally.all_answered is not None:
            tally.all_answered.set()

    def close(self) -> None:
        if self.transport is not None and not self.disconnected:
            self.transport.send_close(WSCloseCode.OK)
            self.transport.disconnect()


async def connect_one(plan: PublishPlan, tally: Tally, pad: str) -> PublishingClient:
    url = f"ws://{plan.host}:{plan.port}/ws?token={quote(plan.token)}"
    _, client = await ws_connect(
        lambda: PublishingClient(tally, plan.channel, pad, plan.window),
        url,
        websocket_handshake_timeout=plan.connect_timeout,
        enable_auto_pong=True,
        logger_name="loadtest",
    )
    assert isinstance(client, PublishingClient)
    return client


async def publish(plan: PublishPlan, pipe: Connection) -> None:
    loop = asyncio.get_running_loop()
    tally = Tally(plan.duration)
    tally.all_answered = asyncio.Event()
    pad = "x" * plan.pad_bytes
    results = await asyncio.gather(
        *(connect_one(plan, tally, pad) for _ in range(plan.publishers)), return_exceptions=True
    )
    clients = [r for r in results if isinstance(r, PublishingClient)]
    failures = Counter(type(r).__name__ for r in results if isinstance(r, BaseException))
    pipe.send(("ready", len(clients), dict(failures)))
    await loop.run_in_executor(None, pipe.recv)  # ("go",)
    tally.running = True
    began = time.perf_counter()
    tally.deadline = began + plan.duration
    for client in clients:
        client.start()
    while time.perf_counter() < tally.deadline:
        await asyncio.sleep(min(PROGRESS_INTERVAL, max(0.0, tally.deadline - time.perf_counter())))
        pipe.send(("progress", tally.acked))
    tally.running = False
    if tally.outstanding > 0:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(tally.all_answered.wait(), ANSWER_WAIT)
    elapsed = (tally.last_answer or time.perf_counter()) - (tally.first_send or began)
    figures = {
        "publishers": len(clients),
        "window": plan.window,
        "sent": tally.sent,
        "acked": tally.acked,
        "refused": dict(tally.refused),
        "unanswered": max(0, tally.outstanding),
        "elapsed_s": round(elapsed, 3),
        "latency": tally.latency.to_state(),
    }
    pipe.send(("done", figures))
    await loop.run_in_executor(None, pipe.recv)  # ("close",)
    for client in clients:
        client.close()
    await asyncio.sleep(0.2)


def publisher_main(plan: PublishPlan, pipe: Connection) -> None:
    """Process entry point (``multiprocessing`` spawn target)."""
    if plan.cpus:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, plan.cpus)
    import uvloop

    with contextlib.suppress(KeyboardInterrupt, EOFError, BrokenPipeError):
        uvloop.run(publish(plan, pipe))


class PublisherProcess:
    """The coordinator's handle on one publishing process."""

    def __init__(self, plan: PublishPlan) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self.pipe, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=publisher_main, args=(plan, child), name="loadtest-publishers", daemon=True
        )
        self.proc.start()
        child.close()
        self.acked = 0

    @property
    def pid(self) -> int | None:
        return self.proc.pid

    async def receive(self, timeout: float) -> tuple[Any, ...]:
        loop = asyncio.get_running_loop()
        if not await loop.run_in_executor(None, self.pipe.poll, timeout):
            raise TimeoutError(f"the publishers said nothing for {timeout:g} s")
        message: tuple[Any, ...] = self.pipe.recv()
        return message

    async def ready(self, timeout: float) -> tuple[int, dict[str, int]]:
        _, connected, failures = await self.receive(timeout)
        return connected, failures

    async def run(self, timeout: float) -> dict[str, Any]:
        """Go; the figures once every answer is in (``progress`` updates ``acked``)."""
        self.pipe.send(("go",))
        while True:
            message = await self.receive(timeout)
            if message[0] == "progress":
                self.acked = message[1]
            elif message[0] == "done":
                figures: dict[str, Any] = message[1]
                return figures

    async def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.pipe.send(("close",))
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.proc.join, 10)
        if self.proc.is_alive():
            self.proc.terminate()
            await loop.run_in_executor(None, self.proc.join, 5)
        self.pipe.close()
