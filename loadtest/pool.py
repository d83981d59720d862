"""The coordinator's side of the client workers: spawn, follow progress, collect results.

Each worker's pipe is read by a thread doing blocking ``recv`` and handing messages to the
event loop: ``loop.add_reader`` would make the pipe non-blocking (uvloop does), and a
multi-kilobyte message read in pieces would then fail half-way.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import threading
from collections import Counter
from multiprocessing.connection import Connection
from typing import Any

from loadtest.histogram import Histogram
from loadtest.worker import WorkerPlan, worker_main


class WorkerError(RuntimeError):
    pass


class WorkerPool:
    def __init__(self, plans: list[WorkerPlan]) -> None:
        self.plans = plans
        self.ctx = multiprocessing.get_context("spawn")
        self.procs: list[multiprocessing.process.BaseProcess] = []
        self.pipes: list[Connection] = []
        self.progress: list[dict[str, Any]] = [{} for _ in plans]
        self.progress_received = [0] * len(plans)  # progress messages, per worker
        self.connected: list[asyncio.Future[dict[str, Any]]] = []
        self.finals: list[asyncio.Future[dict[str, Any]]] = []
        self.replies: dict[tuple[str, int, int], asyncio.Future[tuple[Any, ...]]] = {}
        self.churned = 0  # churn connections attempted, over the workers that finished
        self.churn_done = 0
        self.churn_finished = asyncio.Event()  # every worker reported its churn
        self.cut = 0  # connections cut by ``("cut", at)``, over the workers that did
        self.cut_done = 0
        self.cut_finished = asyncio.Event()  # every worker cut its connections

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        for i, plan in enumerate(self.plans):
            parent, child = self.ctx.Pipe()
            proc = self.ctx.Process(
                target=worker_main, args=(plan, child), name=f"loadtest-worker-{i}", daemon=True
            )
            proc.start()
            child.close()
            self.procs.append(proc)
            self.pipes.append(parent)
            self.connected.append(loop.create_future())
            self.finals.append(loop.create_future())
            reader = threading.Thread(
                target=self._read, args=(i, parent, loop), name=f"loadtest-pipe-{i}", daemon=True
            )
            reader.start()

    def _read(self, i: int, pipe: Connection, loop: asyncio.AbstractEventLoop) -> None:
        """Reader thread: forward every message of worker ``i`` to the loop until EOF."""
        while True:
            try:
                message = pipe.recv()
            except (EOFError, OSError):
                break
            try:
                loop.call_soon_threadsafe(self._on_message, i, message)
            except RuntimeError:  # the loop is closed
                return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._on_eof, i)

    def _on_eof(self, i: int) -> None:
        self.procs[i].join(1)
        error = WorkerError(f"client worker {i} exited (code {self.procs[i].exitcode})")
        for future in (self.connected[i], self.finals[i]):
            if not future.done():
                future.set_exception(error)

    def _on_message(self, i: int, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "progress":
            self.progress[i] = message[1]
            self.progress_received[i] += 1
        elif kind == "connected":
            self.progress[i] = message[1]
            if not self.connected[i].done():
                self.connected[i].set_result(message[1])
        elif kind == "final":
            if not self.finals[i].done():
                self.finals[i].set_result(message[1])
        elif kind == "step":
            future = self.replies.pop(("step", message[1], i), None)
            if future is not None and not future.done():
                future.set_result(message)
        elif kind == "cut":
            self.cut += message[1]
            self.cut_done += 1
            if self.cut_done >= len(self.procs):
                self.cut_finished.set()
        elif kind == "churned":
            self.churned += message[1]
            self.churn_done += 1
            if self.churn_done >= len(self.procs):
                self.churn_finished.set()

    def send(self, command: tuple[Any, ...]) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError, ValueError):
                pipe.send(command)

    async def wait_connected(self) -> list[dict[str, Any]]:
        return list(await asyncio.gather(*self.connected))

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def totals(self) -> dict[str, Any]:
        """Progress of all workers added up."""
        total: dict[str, Any] = {
            "received": 0,
            "ready": 0,
            "closed": 0,
            "failed": 0,
            "churn_ok": 0,
            "churn_failed": 0,
            "lag_ms": 0.0,
        }
        unique: list[int] = []
        announced: list[int] = []
        alive: Counter[str] = Counter()
        for p in self.progress:
            if not p:
                continue
            for key in ("received", "ready", "closed", "failed", "churn_ok", "churn_failed"):
                total[key] += p[key]
            total["lag_ms"] = max(total["lag_ms"], p.get("lag_ms", 0.0))
            for k, n in enumerate(p["unique_by_step"]):
                if k >= len(unique):
                    unique.append(0)
                unique[k] += n
            for k, n in enumerate(p.get("announced_by_step", [])):
                if k >= len(announced):
                    announced.append(0)
                announced[k] += n
            alive.update(p["alive_by_channel"])
        total["unique_by_step"] = unique
        total["announced_by_step"] = announced
        total["alive_by_channel"] = alive
        return total

    async def step_stats(self, step: int, timeout: float = 10.0) -> tuple[Histogram, int]:
        """Latency histogram and unique deliveries of ``step`` so far, over all workers."""
        loop = asyncio.get_running_loop()
        futures = []
        for i, pipe in enumerate(self.pipes):
            future: asyncio.Future[tuple[Any, ...]] = loop.create_future()
            self.replies[("step", step, i)] = future
            futures.append(future)
            with contextlib.suppress(OSError, ValueError):
                pipe.send(("step", step))
        hist, unique = Histogram(), 0
        done, _ = await asyncio.wait(futures, timeout=timeout)
        for future in done:
            _, _, state, n = future.result()
            hist.merge(Histogram.from_state(state))
            unique += n
        return hist, unique

    async def finish(
        self, timeout: float = 60.0, last_seq: dict[str, int] | None = None
    ) -> list[dict[str, Any]]:
        self.send(("finish", last_seq))
        results = await asyncio.wait_for(asyncio.gather(*self.finals), timeout)
        await self.close()
        return list(results)

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        for proc in self.procs:
            await loop.run_in_executor(None, proc.join, 10)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
        for pipe in self.pipes:
            pipe.close()
