"""``python -m loadtest hotpath``: the gateway's own cost per delivery, above the socket write.

A fan-out pass hands each live session the same message (``Session.push``); the
session's transport builds (once) and looks up the bytes (``gateway.wire``) and offers
them to the connection's port, which under the gateway's own protocols is one
``transport.write``. ``sendfloor`` measures that write; this measures everything the
gateway does around it: ``push`` on ``--sessions`` sessions per publication, each
transport writing to a port that takes every write and discards it, so no socket and
no kernel time is in the figure. Reported: ns per delivery for a WebSocket, a
one-channel SSE stream and a two-channel SSE stream (whose events carry the stream's
own cursor, so they are built per stream).
"""

from __future__ import annotations

import time
from typing import Any

from channels.publication import Publication
from channels.session import Session, Transport
from gateway.sse import SSETransport
from gateway.ws import WebSocketTransport


class _Sink:
    """A port that takes every write at once."""

    def try_write(self, data: bytes) -> bool:
        return True


def _transport(kind: str) -> Transport:
    if kind == "websocket":
        return WebSocketTransport(_Sink())  # type: ignore[arg-type]
    channels = ["prices"] if kind == "sse" else ["prices", "news"]
    sse = SSETransport(channels)
    sse.port = _Sink()  # type: ignore[assignment]
    return sse


def measure(kind: str, sessions: int, publications: int) -> float:
    """ns per delivery: ``publications`` fan-outs to ``sessions`` sessions of ``kind``."""
    group = [
        Session(_transport(kind), user="u", info={}, max_queue_bytes=1 << 20, transport_name=kind)
        for _ in range(sessions)
    ]
    pubs = [Publication("prices", n, "e1", b'{"bid":1.01}') for n in range(1, publications + 1)]
    started = time.perf_counter()
    for pub in pubs:
        for session in group:
            session.push(pub)
    return (time.perf_counter() - started) / (sessions * publications) * 1e9


def run_hotpath(*, sessions: int, publications: int) -> dict[str, Any]:
    kinds = ("websocket", "sse", "sse-2-channels")
    return {
        "sessions": sessions,
        "publications": publications,
        "ns_per_delivery": {kind: round(measure(kind, sessions, publications)) for kind in kinds},
    }


def summary(report: dict[str, Any]) -> str:
    lines = [
        f"hotpath: {report['publications']:,} publications x {report['sessions']:,} sessions, "
        "ports that take every write (no socket)"
    ]
    for kind, ns in report["ns_per_delivery"].items():
        lines.append(f"  {kind:<16} {ns:6,} ns per delivery")
    return "\n".join(lines)


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "hotpath",
        help="the gateway's own cost per delivery, with no socket",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("--sessions", type=int, default=1000)
    p.add_argument("--publications", type=int, default=1000)
    p.add_argument("--json", action="store_true", help="print the JSON report on stdout")
