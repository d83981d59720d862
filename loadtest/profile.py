"""A py-spy profile of the server under load, and the top frames of it.

``py-spy record --nonblocking`` samples the server without pausing it (a little less
exact, much less intrusive), in py-spy's ``raw`` (collapsed stacks) format: one line
per distinct stack, ``outer;…;inner count``. The summary ranks functions by *self*
samples (the innermost frame: where the CPU actually was) and by *total* samples
(anywhere on the stack).
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from loadtest.servers import pinned

LINE_NUMBER = re.compile(r":\d+\)$")


def py_spy_binary() -> str | None:
    candidate = Path(sys.executable).with_name("py-spy")
    if candidate.exists():
        return str(candidate)
    return shutil.which("py-spy")


class Profiler:
    def __init__(self, pid: int, out: Path, *, rate: int = 100, cpus: list[int] | None = None):
        self.pid = pid
        self.out = out
        self.rate = rate
        self.cpus = cpus
        self.proc: subprocess.Popen[bytes] | None = None
        self.error: str | None = None

    def start(self, max_seconds: float) -> bool:
        binary = py_spy_binary()
        if binary is None:
            self.error = "py-spy is not installed (pip install py-spy)"
            return False
        self.out.parent.mkdir(parents=True, exist_ok=True)
        argv = [
            binary,
            "record",
            "--pid",
            str(self.pid),
            "--rate",
            str(self.rate),
            "--duration",
            str(max(1, round(max_seconds))),
            "--format",
            "raw",
            "--nonblocking",
            "-o",
            str(self.out),
        ]
        self.proc = subprocess.Popen(
            pinned(argv, self.cpus), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        return True

    def stop(self, timeout: float = 15.0) -> dict[str, Any] | None:
        """Stop recording (py-spy writes its file on SIGINT) and summarise it."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            output, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            output, _ = self.proc.communicate()
        if not self.out.exists():
            self.error = output.decode(errors="replace")[-500:]
            return None
        summary = summarise(self.out)
        summary["raw"] = str(self.out)
        return summary


def frame_name(frame: str) -> str:
    """``send (uvicorn/protocols/…/websockets_sansio_impl.py:432)`` without the line."""
    frame = LINE_NUMBER.sub(")", frame.strip())
    for marker in ("site-packages/", "/work/main/", "lib/python3"):
        index = frame.find(marker)
        if index >= 0:
            start = frame.rfind("(", 0, index) + 1
            frame = frame[:start] + frame[index + len(marker) :]
    return frame


def summarise(path: Path, top: int = 15) -> dict[str, Any]:
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        with contextlib.suppress(ValueError):
            count = int(count_text)
            frames = [frame_name(f) for f in stack.split(";") if f]
            if not frames:
                continue
            samples += count
            own[frames[-1]] += count
            for name in set(frames):
                total[name] += count

    def ranked(counter: Counter[str]) -> list[dict[str, Any]]:
        return [
            {"frame": name, "percent": round(100 * n / samples, 1)}
            for name, n in counter.most_common(top)
        ]

    return {"samples": samples, "self": ranked(own), "total": ranked(total)}


# The event loop itself as the innermost frame: waiting in ``epoll`` (py-spy
# --nonblocking does not tell idle apart) or uvloop's own socket reads and writes in C
# (native code is counted in the Python frame that called it).
LOOP_FRAMES = ("asyncio/runners.py",)


def shares(path: Path, groups: dict[str, tuple[str, ...]]) -> dict[str, Any]:
    """Per group, the % of samples with a frame of it anywhere on the stack (a frame is
    in a group when its file contains one of the group's markers, e.g. ``"httpx/"``): of
    all samples, and of those where Python code ran (the loop's frame not innermost)."""
    hits: Counter[str] = Counter()
    samples = in_loop = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        try:
            count = int(count_text)
        except ValueError:
            continue
        if not stack:
            continue
        samples += count
        innermost = stack.rsplit(";", 1)[-1]
        if any(marker in innermost for marker in LOOP_FRAMES):
            in_loop += count
            continue
        for name, markers in groups.items():
            if any(marker in stack for marker in markers):
                hits[name] += count

    def percent(of: int) -> dict[str, float]:
        return {name: round(100 * hits[name] / of, 1) if of else 0.0 for name in groups}

    return {
        "samples": samples,
        "loop_innermost": in_loop,
        "percent_of_samples": percent(samples),
        "percent_of_python": percent(samples - in_loop),
    }
