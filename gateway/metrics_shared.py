"""``--workers N``: one ``/metrics`` for the whole process, whichever worker a scrape
reaches.

The workers share one listening socket, so a scrape lands on any of them; alone, each
would answer with its own figures, and Prometheus would read every switch from one
worker to another as a counter reset (made-up rates) and never see the totals. As
prometheus-client's multiprocess mode does with its files, each worker writes what its
registry holds to a file of its own in a directory the supervisor made for the run
(every ``PERIOD`` seconds, and just before it answers a scrape), and a scrape is
answered with the sum of every worker's file: counters, gauges and histogram buckets
added up, sample by sample (a ``_created`` timestamp, a process's start time and its
descriptor limit: the least). Each file only
ever grows, so the sum never goes back; another worker's part is at most ``PERIOD``
seconds old. The Kubernetes layout, one worker per pod, does none of this.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

PERIOD = 1.0  # seconds between a worker's writes of its figures

# Set in each worker by the supervisor (``gateway.server.workers``) before the app is made:
# the run's directory, and the supervisor's process id.
directory: str | None = None
supervisor: int | None = None

Sample = tuple[str, tuple[tuple[str, str], ...]]  # a sample's name and labels
# Figures of each process that a sum would make wrong: the earliest stands for all.
EARLIEST = frozenset({"process_start_time_seconds", "process_max_fds"})


class SharedMetrics:
    """This worker's file in ``path``'s directory, and the sum of every worker's."""

    def __init__(self, registry: CollectorRegistry, path: str) -> None:
        self.registry = registry
        self.directory = Path(path)
        self.file = self.directory / f"worker-{os.getpid()}.json"
        self._task: asyncio.Task[None] | None = None

    def write(self) -> None:
        families = [
            [m.name, m.type, m.documentation, [[s.name, s.labels, s.value] for s in m.samples]]
            for m in self.registry.collect()
        ]
        partial = self.file.with_suffix(".partial")
        partial.write_bytes(orjson.dumps(families))
        partial.replace(self.file)  # whole or not at all, for a reader

    def render(self) -> bytes:
        self.write()
        families: dict[str, tuple[str, str, dict[Sample, float]]] = {}
        for file in sorted(self.directory.glob("worker-*.json")):
            try:
                written: list[Any] = orjson.loads(file.read_bytes())
            except (OSError, orjson.JSONDecodeError):
                continue  # a worker gone meanwhile
            for name, kind, documentation, samples in written:
                _, _, sums = families.setdefault(name, (kind, documentation, {}))
                for sample, labels, value in samples:
                    key = (sample, tuple(sorted(labels.items())))
                    if sample.endswith("_created") or sample in EARLIEST:
                        sums[key] = min(sums.get(key, value), value)
                    else:
                        sums[key] = sums.get(key, 0.0) + value
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Summed(families))
        return generate_latest(registry)

    async def start(self) -> None:
        self.write()
        self._task = asyncio.create_task(self._keep_writing(), name="metrics-file")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if supervisor is not None and os.getppid() != supervisor:
            self._leave()  # the supervisor was killed: nobody else will

    def _leave(self) -> None:
        """A worker shutting down after its supervisor was killed (SIGKILL; the supervisor
        removes the run's directory at every other exit): remove this worker's file, then
        the directory if no other worker's is left in it: the last worker out leaves none."""
        for file in (self.file, self.file.with_suffix(".partial")):
            file.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # not empty: another worker is still running
            self.directory.rmdir()

    async def _keep_writing(self) -> None:
        while True:
            await asyncio.sleep(PERIOD)
            with contextlib.suppress(OSError):  # the run's directory removed at its end
                self.write()


class _Summed(Collector):
    def __init__(self, families: dict[str, tuple[str, str, dict[Sample, float]]]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        for name, (kind, documentation, sums) in self.families.items():
            metric = Metric(name, documentation, kind)
            for (sample, labels), value in sums.items():
                metric.add_sample(sample, dict(labels), value)
            yield metric
