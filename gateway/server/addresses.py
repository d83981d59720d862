"""A connection's two ends as uvicorn gives them to an ASGI scope (``server``, ``client``).

Compiled (setup.py): every connect asks it once or twice, from the interpreted protocol.
"""

from __future__ import annotations

from typing import Any


def address(info: Any, *, local: bool) -> tuple[str, int | None] | None:
    """What uvicorn's ``get_local_addr`` / ``get_remote_addr`` make of the socket's
    ``getsockname()`` / ``getpeername()``: host and port (IPv6's four-tuple too), a
    Unix socket's path for the local end only."""
    if local and isinstance(info, str):
        return (info, None)
    return peer(info)


def peer(info: Any) -> tuple[str, int] | None:
    """The remote end (``getpeername()``): host and port, or None (a Unix socket)."""
    if isinstance(info, tuple | list) and len(info) >= 2:
        return (str(info[0]), int(info[1]))
    return None
