"""``--workers N``: N worker processes on one listening socket, each with the contract's drain.

uvicorn's own supervisor builds plain ``uvicorn.Server`` objects in its children, so our
``DrainingServer`` (SIGTERM: stop accepting, not ready, WebSockets closed with 1012, SSE
ended, bounded wait) would not run there. This one is deliberately small:

* the parent binds the socket once and spawns N children (multiprocessing ``spawn``), each
  running ``DrainingServer`` on that socket with the app factory ``gateway.app:create_app``;
* SIGTERM/SIGINT to the parent is forwarded to every child, which drains and exits;
  children sit in their own process group, so a terminal's Ctrl-C reaches them once, through
  the parent (a second SIGINT still forces an exit, as with plain uvicorn);
* a child that exits unasked is not restarted: the others are stopped and the parent exits
  with 1, so that the process manager (systemd, Kubernetes) restarts the whole group rather
  than leaving it half-alive. A child whose parent disappeared (SIGKILL) drains and exits too.

Exit status: 0 when every child ended cleanly after a forwarded signal, else 1.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from multiprocessing.context import SpawnProcess
from types import FrameType

import uvicorn

from gateway import metrics_shared
from gateway.server.draining import DrainingServer
from gateway.server.heap import prepare_heap

logger = logging.getLogger(__name__)

APP_FACTORY = "gateway.app:create_app"
# How long the parent waits for children beyond their own drain before killing them.
EXIT_GRACE = 10.0
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def run_workers(config: uvicorn.Config, workers: int, drain_seconds: float) -> int:
    """Run ``workers`` children serving ``config`` (an app factory string) until signalled."""
    sock = config.bind_socket()
    metrics = tempfile.mkdtemp(prefix="gateway-metrics-")  # each worker's figures
    context = multiprocessing.get_context("spawn")
    children: list[SpawnProcess] = []
    requested: list[int] = []  # signals received, in order

    def forward(signum: int, frame: FrameType | None = None) -> None:
        requested.append(signum)
        for child in children:
            if child.pid is not None and child.exitcode is None:
                _signal_child(child, signum)

    previous = {sig: signal.signal(sig, forward) for sig in _STOP_SIGNALS}
    try:
        for index in range(workers):
            child = context.Process(
                target=_worker_main,
                args=(config, sock, os.getpid(), metrics),
                name=f"gateway-worker-{index}",
            )
            children.append(child)
            child.start()
            logger.info("started worker %d [%d]", index, child.pid)
            if requested:
                _signal_child(child, requested[-1])
        sock.close()  # the children have their own copies
        return _supervise(children, requested, drain_seconds)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for child in children:
            if child.exitcode is None:
                child.kill()
                child.join(5)
        shutil.rmtree(metrics, ignore_errors=True)


def _supervise(children: list[SpawnProcess], requested: list[int], drain_seconds: float) -> int:
    failed = False
    deadline: float | None = None
    running = list(children)
    while running:
        multiprocessing.connection.wait([child.sentinel for child in running], timeout=0.5)
        if requested and deadline is None:
            deadline = time.monotonic() + drain_seconds + EXIT_GRACE
        for child in [child for child in running if child.exitcode is not None]:
            running.remove(child)
            code = child.exitcode
            if not requested:
                logger.error("worker %s exited unasked (%s): stopping the others", child.pid, code)
                failed = True
                requested.append(signal.SIGTERM)
                for other in running:
                    _signal_child(other, signal.SIGTERM)
            elif code not in (0, -signal.SIGTERM, -signal.SIGINT):
                logger.error("worker %s exited with %s", child.pid, code)
                failed = True
        if deadline is not None and time.monotonic() > deadline:
            for child in running:
                logger.error("worker %s did not exit after the drain: killing it", child.pid)
                child.kill()
                child.join(5)
            return 1
    return 1 if failed else 0


def _signal_child(child: SpawnProcess, signum: int) -> None:
    if child.pid is not None:
        with contextlib.suppress(ProcessLookupError):  # it just exited
            os.kill(child.pid, signum)


def _worker_main(
    config: uvicorn.Config, sock: socket.socket, parent_pid: int, metrics: str
) -> None:
    """A child: own process group, a watchdog on the parent, its figures summed with the
    others' for /metrics, then ``DrainingServer``."""
    os.setpgid(0, 0)
    metrics_shared.directory, metrics_shared.supervisor = metrics, parent_pid
    threading.Thread(
        target=_watch_parent, args=(parent_pid,), name="parent-watchdog", daemon=True
    ).start()
    config.configure_logging()
    config.load()  # the app, built before the heap is frozen (the server skips it then)
    prepare_heap()
    DrainingServer(config).run(sockets=[sock])


def _watch_parent(parent_pid: int) -> None:
    """Drain and exit (SIGTERM to ourselves) once the supervisor is gone."""
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    logger.warning("supervisor %d is gone: shutting down", parent_pid)
    os.kill(os.getpid(), signal.SIGTERM)
