"""The load generator's readings of a process's CPU time."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from loadtest.procstat import ProcessSampler, Sample, cpu_seconds, exact_cpu_seconds


def spin(seconds: float) -> None:
    """Use ``seconds`` of this process's CPU time (not wall time: the machine is shared)."""
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_exact_cpu_time_sees_less_than_one_clock_tick() -> None:
    pid = os.getpid()
    before = exact_cpu_seconds(pid)
    spin(0.004)  # under the 10 ms tick that /proc/<pid>/stat counts in
    used = exact_cpu_seconds(pid) - before
    assert 0.004 <= used < 1.0


def test_exact_cpu_time_agrees_with_the_ticks() -> None:
    """A child that used 0.3 s of CPU and waits: both readings say so (the ticks to
    within a few ticks). A child, since this process may have threads that exited, which
    only the ticks count."""
    code = (
        "import sys, time\n"
        "end = time.process_time() + 0.3\n"
        "while time.process_time() < end: pass\n"
        "print('spun', flush=True)\n"
        "sys.stdin.read()\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as child:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline() == "spun\n"
        exact, ticks = exact_cpu_seconds(child.pid), cpu_seconds(child.pid)
        child.stdin.close()
    assert exact >= 0.3
    assert abs(exact - ticks) <= 0.05


def test_a_window_a_starved_sampler_missed_is_widened_to_its_nearest_samples() -> None:
    sampler = ProcessSampler(0, [Sample(t, t / 10, 1000) for t in (1.0, 2.0, 6.0, 7.0)])
    assert [s.at for s in sampler.around(1.5, 2.5)] == [1.0, 2.0, 6.0]  # one inside
    assert [s.at for s in sampler.around(3.0, 5.0)] == [2.0, 6.0]  # none inside
    assert [s.at for s in sampler.around(0.5, 6.5)] == [1.0, 2.0, 6.0]  # enough inside
    assert sampler.around(8.0, 9.0)[-1].at == 7.0
    assert sampler.utilisation(3.0, 5.0) == 10.0
