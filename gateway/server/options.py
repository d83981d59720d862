"""Which uvicorn protocols the gateway runs on, and the uvicorn options its settings imply.

Two modes:

- **gateway** (``GATEWAY_RAW_WRITES=true``, the default): the gateway's subclasses of
  uvicorn's websockets-sansio and httptools protocols (``gateway.server.websocket``,
  ``gateway.server.http``), which write pushes straight to sockets and let connections
  outlive their ASGI call. They extend private uvicorn API, so they are installed only
  on the uvicorn releases the test suite passed on (``UVICORN_TESTED``, the same range
  as pyproject.toml's); on any other release the gateway falls back to stock mode and
  says so in the log.
- **stock** (``GATEWAY_RAW_WRITES=false``, or a fallback): uvicorn's own protocols,
  unchanged; every write goes through ASGI (``gateway.server.asgi``).

``server_choice`` decides and explains; ``python -m gateway`` logs the explanation at
start-up, and each fallback as a warning.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any

import uvicorn

from gateway.logs import log_config
from gateway.settings import Settings

# The uvicorn releases the gateway's protocols were tested on: at least the first,
# below the second (pyproject.toml says the same; tests/test_server_adapter.py checks).
UVICORN_TESTED = ((0, 52), (0, 56))
# Stock mode: the app itself refuses messages over GATEWAY_MAX_MESSAGE_BYTES (with the
# contract's close reason), so the parser's own limit is only a backstop (uvicorn's).
STOCK_PARSER_LIMIT = 16 * 1024 * 1024


def _release(version: str) -> tuple[int, int]:
    """``(major, minor)`` of a version string such as ``0.55.0`` or ``1.0rc1``."""
    parts = [int("".join(c for c in part if c.isdigit()) or 0) for part in version.split(".")]
    major, minor = ([*parts, 0, 0])[:2]
    return major, minor


def is_tested(version: str) -> bool:
    low, high = UVICORN_TESTED
    return low <= _release(version) < high


@dataclass(frozen=True, slots=True)
class ServerChoice:
    websocket: bool  # the gateway's WebSocket protocol
    http: bool  # the gateway's HTTP protocol (raw SSE writes)
    httptools: bool  # else h11
    summary: str
    fallbacks: list[str] = field(default_factory=list)


def server_choice(
    settings: Settings,
    *,
    uvicorn_version: str = uvicorn.__version__,
    httptools: bool | None = None,
) -> ServerChoice:
    if httptools is None:
        httptools = importlib.util.find_spec("httptools") is not None
    fallbacks: list[str] = []
    if not settings.raw_writes:
        return ServerChoice(
            False,
            False,
            httptools,
            f"uvicorn {uvicorn_version}, stock protocols (GATEWAY_RAW_WRITES=false): "
            "every write through ASGI",
        )
    if not is_tested(uvicorn_version):
        low, high = UVICORN_TESTED
        fallbacks.append(
            f"uvicorn {uvicorn_version} is outside the releases the gateway's protocols were "
            f"tested on (>= {low[0]}.{low[1]}, < {high[0]}.{high[1]}): using uvicorn's stock "
            "protocols, every write through ASGI"
        )
        return ServerChoice(
            False, False, httptools, f"uvicorn {uvicorn_version}, stock protocols", fallbacks
        )
    if not httptools:
        fallbacks.append(
            "httptools is not installed: HTTP on uvicorn's h11 protocol, SSE written through ASGI"
        )
    what = "raw writes and detached connections" + ("" if httptools else " (WebSocket only)")
    return ServerChoice(
        True,
        httptools,
        httptools,
        f"uvicorn {uvicorn_version} with the gateway's protocols: {what}",
        fallbacks,
    )


def uvicorn_options(settings: Settings, choice: ServerChoice | None = None) -> dict[str, Any]:
    """The uvicorn configuration the gateway's settings imply (also used by the tests)."""
    choice = choice or server_choice(settings)
    options: dict[str, Any] = {
        "ws_ping_interval": settings.ping_interval,
        "ws_ping_timeout": settings.ping_timeout,
        "ws_per_message_deflate": False,
        "timeout_graceful_shutdown": max(1.0, settings.drain_seconds),
        "log_level": settings.log_level,
        "access_log": settings.access_log,
        "backlog": settings.listen_backlog,
        "log_config": log_config(settings.log_level),
        "loop": "uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
    }
    if choice.websocket:
        from gateway.server.websocket import GatewayWebSocketProtocol

        options["ws"] = GatewayWebSocketProtocol
        # The parser refuses bigger messages before buffering them: 1009 "message too big".
        options["ws_max_size"] = settings.max_message_bytes
    else:
        options["ws"] = "websockets-sansio"
        options["ws_max_size"] = max(STOCK_PARSER_LIMIT, settings.max_message_bytes)
    if choice.http:
        from gateway.server.front import FrontDoor
        from gateway.server.perserver import Protocols

        options["http"] = Protocols(FrontDoor)
    else:
        options["http"] = "httptools" if choice.httptools else "h11"
    return options
