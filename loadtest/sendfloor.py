"""``python -m loadtest sendfloor``: what one ``send()`` per subscriber costs, with no server.

A fan-out writes each publication to every subscriber's socket: one ``send()`` each,
and on loopback the kernel also runs the receiving side's TCP path and wakes the
reader. That cost is a floor under any Python server's fan-out (the gateway's
profile is ~85 % ``transport.write``), and so under its latency: the median of N
subscribers gets its copy no sooner than N/2 sends after the first.

This measures the floor on the machine at hand. The sender (this process, pinned to
``--sender-cpus``) accepts ``--clients`` loopback TCP connections (``TCP_NODELAY``, as
uvicorn sets) from a receiver process (pinned to ``--receiver-cpus``) that only reads
and discards; then, ``--rounds`` times at ``--rate`` rounds/s, sends one
``--payload-bytes`` message to every connection in a plain loop. Reported per round
(median and max over the rounds): µs of wall and CPU time per ``send()``, and the time
until the N/2-th send returned (the floor of a fan-out's p50 latency at that size),
and each round's time (``round_ms``) with the median of the first ``WARM_UP_ROUNDS``
against the rest's: a connection's receiver acknowledges its first 16 segments at
once, and again every segment after a pause longer than its retransmission timeout
(200 ms at least), so the first rounds at any rate, and every round below 5/s, are
sent while the acknowledgements of earlier ones arrive (docs/benchmarks.md, "The
floor, and the receivers' acknowledgements").
"""

from __future__ import annotations

import os
import select
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

RECEIVER_FLAG = "--receive"
WARM_UP_ROUNDS = 16


def receive(port: int, clients: int) -> None:
    """The receiver process: connect ``clients`` sockets, read and discard until all close."""
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(clients)]
    poller = select.epoll()
    by_fd: dict[int, socket.socket] = {}
    for sock in socks:
        sock.setblocking(False)
        poller.register(sock.fileno(), select.EPOLLIN)
        by_fd[sock.fileno()] = sock
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    while by_fd:
        for fd, _ in poller.poll():
            sock = by_fd[fd]
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                continue
            if not data:
                poller.unregister(fd)
                sock.close()
                del by_fd[fd]


def pin(cpus: list[int] | None) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)


def run_sendfloor(
    *,
    clients: int,
    rounds: int,
    rate: float,
    payload_bytes: int,
    sender_cpus: list[int] | None,
    receiver_cpus: list[int] | None,
) -> dict[str, Any]:
    pin(sender_cpus)
    listener = socket.create_server(("127.0.0.1", 0), backlog=min(clients, 4096))
    port = listener.getsockname()[1]
    command = [sys.executable, "-m", "loadtest.sendfloor", RECEIVER_FLAG, str(port), str(clients)]
    if receiver_cpus:
        command = ["taskset", "-c", ",".join(map(str, receiver_cpus)), *command]
    receiver = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        socks = []
        for _ in range(clients):
            sock, _ = listener.accept()
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            socks.append(sock)
        assert receiver.stdout is not None
        if receiver.stdout.readline().strip() != "ready":
            raise RuntimeError("the receiver process did not start")
        payload = b"x" * payload_bytes
        wall: list[float] = []
        cpu: list[float] = []
        half: list[float] = []
        middle = clients // 2
        period = 1.0 / rate if rate > 0 else 0.0
        next_round = time.perf_counter()
        for _ in range(rounds):
            delay = next_round - time.perf_counter()
            if delay > 0:
                time.sleep(delay)  # a standalone measuring loop, not a server
            next_round += period
            started, started_cpu = time.perf_counter(), time.thread_time()
            reached_half = started
            for n, sock in enumerate(socks):
                sock.sendall(payload)
                if n == middle:
                    reached_half = time.perf_counter()
            wall.append(time.perf_counter() - started)
            cpu.append(time.thread_time() - started_cpu)
            half.append(reached_half - started)
        for sock in socks:
            sock.close()
        receiver.wait(timeout=30)
    finally:
        listener.close()
        if receiver.poll() is None:
            receiver.kill()

    def us_per_send(values: list[float]) -> dict[str, float]:
        return {
            "median": round(statistics.median(values) / clients * 1e6, 2),
            "max": round(max(values) / clients * 1e6, 2),
        }

    first, rest = wall[:WARM_UP_ROUNDS], wall[WARM_UP_ROUNDS:]
    return {
        "scenario": "sendfloor",
        "clients": clients,
        "rounds": rounds,
        "rate": rate,
        "payload_bytes": len(payload),
        "sender_cpus": sender_cpus,
        "receiver_cpus": receiver_cpus,
        "wall_us_per_send": us_per_send(wall),
        "cpu_us_per_send": us_per_send(cpu),
        "median_subscriber_ms": {
            "median": round(statistics.median(half) * 1e3, 2),
            "max": round(max(half) * 1e3, 2),
        },
        "round_ms": [round(value * 1e3, 2) for value in wall],
        "first_rounds_ms": round(statistics.median(first) * 1e3, 2),
        "later_rounds_ms": round(statistics.median(rest) * 1e3, 2) if rest else None,
    }


def summary(report: dict[str, Any]) -> str:
    wall, cpu = report["wall_us_per_send"], report["cpu_us_per_send"]
    half = report["median_subscriber_ms"]
    return (
        f"sendfloor: {report['clients']:,} loopback connections, {report['rounds']} rounds "
        f"at {report['rate']:g}/s, {report['payload_bytes']}-byte messages\n"
        f"  per send(): wall {wall['median']} us (max round {wall['max']}), "
        f"cpu {cpu['median']} us (max round {cpu['max']})\n"
        f"  the median connection's send returned {half['median']} ms after the round "
        f"started (max {half['max']} ms): the p50 floor of a fan-out to this many\n"
        f"  a round took {report['first_rounds_ms']} ms (median) in the first "
        f"{WARM_UP_ROUNDS}, {report['later_rounds_ms']} ms after them"
    )


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "sendfloor",
        help="the cost of one send() per subscriber on this machine, with no server",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("--clients", type=int, default=5000)
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--rate", type=float, default=20.0, help="rounds/s; 0: back to back")
    p.add_argument("--payload-bytes", type=int, default=100)
    p.add_argument("--sender-cpus", default="0", help="e.g. 0; empty: not pinned")
    p.add_argument("--receiver-cpus", default="1", help="e.g. 1; empty: not pinned")
    p.add_argument("--json", action="store_true", help="print the JSON report on stdout")


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == RECEIVER_FLAG:
    receive(int(sys.argv[2]), int(sys.argv[3]))
