"""The slow consumer: a client that reads its socket only once every ``interval`` seconds.

With a small kernel receive buffer (``open_socket(rcvbuf=...)``) the server's outbound
buffer for it grows by (publication rate x size) per second; a server with bounded
per-client queues closes it, one that awaits each send slows everyone down.
"""

from __future__ import annotations

import asyncio
import contextlib


class ReadThrottle:
    __slots__ = ("_handle", "_interval", "_transport")

    def __init__(self, transport: asyncio.Transport, interval: float) -> None:
        self._transport = transport
        self._interval = interval
        self._handle: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(
            interval, self._resume
        )

    def on_data(self) -> None:
        """Called after data was read: stop reading until the next tick."""
        with contextlib.suppress(Exception):
            self._transport.pause_reading()

    def _resume(self) -> None:
        if self._transport.is_closing():
            self._handle = None
            return
        with contextlib.suppress(Exception):
            self._transport.resume_reading()
        self._handle = asyncio.get_running_loop().call_later(self._interval, self._resume)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
