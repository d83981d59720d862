"""CPU time and memory of a process from ``/proc`` (Linux), and the pid behind a port.

CPU is ``utime + stime`` of ``/proc/<pid>/stat`` (all threads), RSS is ``VmRSS`` of
``/proc/<pid>/status``. A sampler turns successive readings into utilisation: 100 %
is one core fully busy.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
LISTEN = "0A"


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by ``pid``."""
    text = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def exact_cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid``'s live threads to the nanosecond, from their ``schedstat``.

    ``/proc/<pid>/stat`` counts in clock ticks (10 ms): too coarse for a few dozen
    connections of a few hundred microseconds each. Threads that exited are not counted,
    so this is for differences over a window in which the process keeps its threads;
    without ``schedstat`` (a kernel built without it) it falls back to the ticks.
    """
    total = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError):
                total += int((task / "schedstat").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return cpu_seconds(pid)
    return total / 1e9


def memory_kib(pid: int) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` (peak RSS) of ``pid`` in KiB."""
    wanted = {"VmRSS", "VmHWM"}
    found: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in wanted:
            found[key] = int(value.split()[0])
    return found


def rss_kib(pid: int) -> int:
    return memory_kib(pid).get("VmRSS", 0)


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def listening_inodes(port: int) -> set[str]:
    """The sockets listening on TCP ``port`` (IPv4 or IPv6), as ``socket:[inode]``."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            local, state, inode = parts[1], parts[3], parts[9]
            if state == LISTEN and int(local.rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{inode}]")
    return inodes


def find_pid_by_port(port: int) -> int | None:
    """The pid of the process listening on TCP ``port`` (IPv4 or IPv6), or None.

    Reads the socket inodes of listening sockets from ``/proc/net/tcp*`` and looks for a
    process holding one of them; processes of other users cannot be seen without root.
    """
    inodes = listening_inodes(port)
    if not inodes:
        return None
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                if os.readlink(fd) in inodes:
                    return int(proc.name)
        except OSError:
            continue
    return None


@dataclass
class Sample:
    at: float  # time.time()
    cpu: float  # CPU seconds so far
    rss_kib: int


@dataclass
class ProcessSampler:
    """Periodic readings of one process; ``utilisation`` over any time window."""

    pid: int
    samples: list[Sample] = field(default_factory=list)

    def sample(self) -> Sample | None:
        try:
            s = Sample(time.time(), cpu_seconds(self.pid), rss_kib(self.pid))
        except (OSError, ValueError, IndexError):
            return None
        self.samples.append(s)
        return s

    def window(self, start: float, end: float) -> list[Sample]:
        return [s for s in self.samples if start <= s.at <= end]

    def around(self, start: float, end: float) -> list[Sample]:
        """``window``; one too short for two samples (a sampler starved on a busy
        machine) widened to the nearest sample on either side."""
        inside = self.window(start, end)
        if len(inside) < 2:
            before = [s for s in self.samples if s.at < start][-1:]
            after = [s for s in self.samples if s.at > end][:1]
            inside = before + inside + after
        return inside

    def utilisation(self, start: float, end: float) -> float | None:
        """CPU % (100 = one core) between the first and last samples ``around`` the
        window."""
        inside = self.around(start, end)
        if len(inside) < 2 or inside[-1].at <= inside[0].at:
            return None
        return 100.0 * (inside[-1].cpu - inside[0].cpu) / (inside[-1].at - inside[0].at)

    def rss_max_kib(self, start: float, end: float) -> int | None:
        inside = self.window(start, end)
        return max(s.rss_kib for s in inside) if inside else None

    def latest(self) -> Sample | None:
        return self.samples[-1] if self.samples else None

    def recent_utilisation(self, seconds: float = 2.0) -> float | None:
        if not self.samples:
            return None
        end = self.samples[-1].at
        return self.utilisation(end - seconds, end)


def cpu_jiffies() -> dict[int, tuple[int, int]]:
    """Per CPU (busy, total) jiffies from ``/proc/stat``: whole-machine load, whoever runs it."""
    result: dict[int, tuple[int, int]] = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3:4].isdigit():
            name, *values = line.split()
            numbers = [int(v) for v in values]
            idle = numbers[3] + (numbers[4] if len(numbers) > 4 else 0)  # idle + iowait
            total = sum(numbers[:8])
            result[int(name[3:])] = (total - idle, total)
    return result


@dataclass
class MachineSampler:
    """Busy % of each CPU over a window (every process on the machine, not only ours)."""

    samples: list[tuple[float, dict[int, tuple[int, int]]]] = field(default_factory=list)

    def sample(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.samples.append((time.time(), cpu_jiffies()))

    def busy(self, start: float, end: float) -> dict[int, float]:
        inside = [s for s in self.samples if start <= s[0] <= end]
        if len(inside) < 2:
            return {}
        first, last = inside[0][1], inside[-1][1]
        result: dict[int, float] = {}
        for cpu, (busy, total) in last.items():
            if cpu in first and total > first[cpu][1]:
                result[cpu] = round(100.0 * (busy - first[cpu][0]) / (total - first[cpu][1]), 1)
        return result


async def wait_for_quiet(
    threshold: float, *, window: float = 3.0, max_wait: float = 120.0
) -> tuple[dict[int, float], float]:
    """Wait until every CPU is below ``threshold`` % busy over ``window`` s (other people's
    processes on a shared machine), at most ``max_wait`` s. Returns the last busy figures
    and how long it waited."""
    import asyncio

    started = time.monotonic()
    while True:
        sampler = MachineSampler()
        sampler.sample()
        await asyncio.sleep(window)
        sampler.sample()
        busy = sampler.busy(0, float("inf"))
        waited = time.monotonic() - started
        if all(v < threshold for v in busy.values()) or waited >= max_wait:
            return busy, waited


def usable_cpus() -> set[int]:
    from loadtest.config import USABLE_CPUS

    return set(USABLE_CPUS)


def machine_info() -> dict[str, object]:
    """nproc, CPU model, memory, Python and kernel: what a benchmark table needs."""
    import platform

    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kib = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "usable_cpus": sorted(usable_cpus()),
        "cpu_model": model,
        "memory_gib": round(mem_kib / 1048576, 1),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "kernel": platform.release(),
        "loadavg_at_start": list(os.getloadavg()),
    }
