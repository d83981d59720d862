"""uvicorn's server with the contract's shutdown order.

On SIGTERM: stop accepting, then the app's drain (not ready, WebSockets closed with
1012, SSE streams ended, a bounded wait for them), a wait for what that left in the
sockets' buffers to be sent, then uvicorn's own shutdown and the app's lifespan end,
which closes the broker.

The app hands its drain to the server through the lifespan state (the ASGI way for
an app to share something with its server): ``DRAIN`` names a coroutine function
there. ``timeout_graceful_shutdown`` is the budget of the whole sequence, not of each
step: uvicorn's own wait for in-flight requests gets only what the drain left, so a
stuck client cannot make the exit take twice as long.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import socket
import termios
from collections.abc import Awaitable, Callable
from typing import Any

import uvicorn

logger = logging.getLogger(__name__)

DRAIN = "gateway.drain"  # lifespan state: the app's drain, ``async () -> None``


class DrainingServer(uvicorn.Server):
    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        budget = float(self.config.timeout_graceful_shutdown or 0)
        # 1. Stop accepting: new connections are refused from here on.
        for server in self.servers:
            server.close()
        # 2. The app: not ready, sessions asked to close (1012 / end of stream), bounded wait.
        drain = self.app_drain()
        if drain is not None:
            try:
                await drain()
            except Exception:
                logger.exception("the app's drain failed")
        # 3. What the drain's last writes left in the sockets' buffers (a client that
        #    reads slowly: its queued messages, its 1012) goes out before the exit.
        await flushed(self.server_state.connections, started + budget)
        #    Those whose client stopped reading are reset now: uvicorn would wait for
        #    them with what is left of the budget, then cancel and log an error.
        for connection in list(self.server_state.connections):
            if unsent(connection):
                connection.transport.abort()
        # 4. uvicorn closes idle keep-alive connections and waits for in-flight requests
        #    (a streamed publish, say) with what is left of the budget, then cancels them;
        #    then the lifespan shutdown closes the broker.
        #    At least a moment for what was just reset to be gone: with no time at all,
        #    uvicorn logs an error ("timeout graceful shutdown exceeded") even when
        #    nothing is left to wait for.
        remaining = max(0.5, started + budget - loop.time())
        # uvicorn annotates it ``int`` but only hands it to ``asyncio.wait_for``.
        self.config.timeout_graceful_shutdown = remaining  # type: ignore[assignment]
        await super().shutdown(sockets=sockets)

    def app_drain(self) -> Callable[[], Awaitable[None]] | None:
        state: dict[str, Any] = getattr(getattr(self, "lifespan", None), "state", None) or {}
        drain = state.get(DRAIN)
        return drain if callable(drain) else None


FLUSH_POLL = 0.05  # seconds between looks at the sockets' buffers while the drain flushes


async def flushed(connections: set[Any], deadline: float) -> None:
    """Return once no connection has bytes waiting to be sent, in the transport's
    buffer or the kernel's (a process that exits with them loses them: the kernel
    gives up a closed socket that its client does not read, and resets it), or at
    ``deadline`` (the loop's clock): a client that stopped reading holds no exit."""
    loop = asyncio.get_running_loop()
    while any(unsent(connection) for connection in list(connections)):
        if loop.time() >= deadline:
            return
        await asyncio.sleep(FLUSH_POLL)


def unsent(connection: Any) -> int:
    """Bytes of ``connection`` not yet sent: its transport's buffer, then the kernel's
    send queue (``TIOCOUTQ``); 0 once it is closed or when it cannot be asked."""
    transport = getattr(connection, "transport", None)
    if transport is None or transport.is_closing():
        return 0
    waiting = int(transport.get_write_buffer_size())
    sock = transport.get_extra_info("socket")
    if waiting or sock is None:
        return waiting
    with contextlib.suppress(OSError, ValueError):
        queued = bytearray(4)
        fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, queued)
        return int.from_bytes(queued, "little")
    return 0
