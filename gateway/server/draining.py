"""uvicorn's server with the contract's shutdown order.

On SIGTERM: stop accepting, then the app's drain (not ready, WebSockets closed with
1012, SSE streams ended, a bounded wait for them), then uvicorn's own shutdown and
the app's lifespan end, which closes the broker.

The app hands its drain to the server through the lifespan state (the ASGI way for
an app to share something with its server): ``DRAIN`` names a coroutine function
there. ``timeout_graceful_shutdown`` is the budget of the whole sequence, not of each
step: uvicorn's own wait for in-flight requests gets only what the drain left, so a
stuck client cannot make the exit take twice as long.
"""

from __future__ import annotations

import asyncio
import logging
import socket
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
        # 3. uvicorn closes idle keep-alive connections and waits for in-flight requests
        #    (a streamed publish, say) with what is left of the budget, then cancels them;
        #    then the lifespan shutdown closes the broker.
        remaining = max(0.0, started + budget - loop.time())
        # uvicorn annotates it ``int`` but only hands it to ``asyncio.wait_for``.
        self.config.timeout_graceful_shutdown = remaining  # type: ignore[assignment]
        await super().shutdown(sockets=sockets)

    def app_drain(self) -> Callable[[], Awaitable[None]] | None:
        state: dict[str, Any] = getattr(getattr(self, "lifespan", None), "state", None) or {}
        drain = state.get(DRAIN)
        return drain if callable(drain) else None
