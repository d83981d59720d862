"""Counting the server's instructions, for figures that do not move with a noisy machine.

CPU time per connect varies by a third from run to run when other work shares the
machine (caches, frequency, the other core's load). The number of instructions the
server executes for the same work does not: ``connect --instructions`` runs the server
under Valgrind's callgrind with instrumentation off (start-up runs at near full
speed), switches it on for the measured phase only, and dumps a total after each phase.
Only user-space instructions count (the kernel's share of a connect is not in them),
and the server runs some 50 times slower meanwhile, so the figure compares versions of
the same server, or servers with the same system calls: it is not a time.

Needs ``valgrind`` (Debian's ``valgrind`` package), which brings ``callgrind_control``.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from loadtest.config import Setup
from loadtest.targets import TARGETS

ENV = "LOADTEST_CALLGRIND"  # the server's environment: callgrind's output file
DUMP_TIMEOUT = 120.0
_TOTALS = re.compile(rb"^totals:\s+(\d+)", re.MULTILINE)


def available() -> str | None:
    """Why the instruction count cannot run here, or None."""
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian package valgrind)"
    return None


def prepare(setup: Setup) -> tuple[Setup, str]:
    """``setup`` with its server to run under callgrind, and callgrind's output file (in
    a directory of its own, removed with the server: ``ManagedProcess.scratch``);
    ``SystemExit`` saying why when that cannot be (the tool must start a Python server)."""
    missing = available()
    python_server = setup.target == "gateway" or TARGETS[setup.target].module is not None
    if missing or not python_server or setup.url:
        why = missing or "for a Python server this tool starts (the gateway, a baseline)"
        raise SystemExit(f"--instructions: {why}")
    out = str(Path(tempfile.mkdtemp(prefix="loadtest-callgrind-")) / "callgrind.out")
    return replace(setup, server_env={**setup.server_env, ENV: out}), out


def wrapped(argv: list[str], out: str) -> list[str]:
    """``argv`` under callgrind, instrumentation off until ``Counter.start``."""
    return [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={out}",
        *argv,
    ]


class Counter:
    """The instructions of one server (its pid, its callgrind output file) by phase."""

    def __init__(self, pid: int, out: str) -> None:
        self.pid, self.out = pid, Path(out)
        self._dumps = 0

    async def start(self) -> None:
        await self._control("-i", "on")

    async def stop(self) -> None:
        await self._control("-i", "off")

    async def phase(self) -> int:
        """Instructions since the last phase ended (or since ``start``)."""
        await self._control("-d")
        self._dumps += 1
        dump = self.out.with_name(f"{self.out.name}.{self._dumps}")
        deadline = time.monotonic() + DUMP_TIMEOUT
        while True:
            if dump.exists():
                found = _TOTALS.search(dump.read_bytes())
                if found:
                    return int(found[1])
            if time.monotonic() > deadline:
                raise TimeoutError(f"callgrind wrote no totals to {dump}")
            await asyncio.sleep(0.2)

    async def _control(self, *args: str) -> None:
        command = ["callgrind_control", *args, str(self.pid)]
        done = await asyncio.to_thread(
            subprocess.run, command, capture_output=True, timeout=DUMP_TIMEOUT, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.decode()}")
