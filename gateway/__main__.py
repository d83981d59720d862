"""``python -m gateway`` / ``gateway``: run the gateway under uvicorn.

In dev mode (no key configured) this prints a ready-to-use dev token on
stdout; the token is deliberately never given to a logger.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
from typing import Any

import uvicorn

from auth.tokens import make_token, new_dev_secret
from gateway.logs import log_config
from gateway.settings import Settings
from gateway.wsprotocol import GatewayWebSocketProtocol


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """The uvicorn configuration the gateway's settings imply (also used by the tests)."""
    options: dict[str, Any] = {
        "ws": GatewayWebSocketProtocol,
        # The parser refuses bigger messages before buffering them: 1009 "message too big".
        "ws_max_size": settings.max_message_bytes,
        "ws_ping_interval": settings.ping_interval,
        "ws_ping_timeout": settings.ping_timeout,
        "ws_per_message_deflate": False,
        "timeout_graceful_shutdown": max(1.0, settings.drain_seconds),
        "log_level": settings.log_level,
        "log_config": log_config(settings.log_level),
    }
    try:
        import uvloop  # noqa: F401

        options["loop"] = "uvloop"
    except ImportError:  # pragma: no cover - uvicorn[standard] brings it
        options["loop"] = "asyncio"
    try:
        import httptools  # noqa: F401

        from gateway.httpprotocol import GatewayHttpToolsProtocol

        options["http"] = GatewayHttpToolsProtocol  # raw SSE writes (GATEWAY_RAW_WRITES)
    except ImportError:  # pragma: no cover
        options["http"] = "h11"
    return options


class DrainingServer(uvicorn.Server):
    """uvicorn's server with the contract's shutdown order.

    On SIGTERM: stop accepting, report not ready, close WebSockets with 1012 and end
    SSE streams (waiting for them up to ``GATEWAY_DRAIN_SECONDS``), then let uvicorn
    finish its own shutdown and the app's lifespan close the broker.

    ``GATEWAY_DRAIN_SECONDS`` is the budget of the whole sequence, not of each step:
    uvicorn's own wait for in-flight requests (``timeout_graceful_shutdown``) gets only
    what the session drain left, so a stuck client cannot make the exit take twice as long.
    """

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        from gateway.runtime import Gateway

        loop = asyncio.get_running_loop()
        started = loop.time()
        gateways = list(Gateway.instances)
        budget = max((gw.settings.drain_seconds for gw in gateways), default=0.0)
        # 1. Stop accepting: new connections are refused from here on.
        for server in self.servers:
            server.close()
        # 2. Not ready, sessions asked to close (1012 / end of stream), bounded wait.
        drains = [gw.drain(gw.settings.drain_seconds) for gw in gateways]
        if drains:
            await asyncio.gather(*drains, return_exceptions=True)
        # 3. uvicorn closes idle keep-alive connections and waits for in-flight requests
        #    (a streamed publish, say) with what is left of the budget, then cancels them;
        #    then the lifespan shutdown closes the broker.
        if gateways:
            # uvicorn annotates it ``int`` but only hands it to ``asyncio.wait_for``.
            remaining = max(0.0, started + budget - loop.time())
            self.config.timeout_graceful_shutdown = remaining  # type: ignore[assignment]
        await super().shutdown(sockets=sockets)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gateway", description=__doc__)
    parser.add_argument("--host", default=os.environ.get("GATEWAY_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GATEWAY_PORT", "8000")))
    parser.add_argument("--workers", type=int, default=int(os.environ.get("GATEWAY_WORKERS", "1")))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = Settings()
    if args.workers < 1:
        sys.stderr.write("gateway: --workers must be at least 1\n")
        return 2
    if args.workers > 1 and settings.broker_url.startswith("memory:"):
        sys.stderr.write(
            "gateway: --workers > 1 needs a shared broker: the memory:// broker lives inside one "
            "process, so workers would not see each other's publications, offsets or presence. "
            "Set GATEWAY_BROKER_URL=redis://host:6379/0 or run one worker.\n"
        )
        return 2
    if settings.dev_mode and settings.env == "production":
        sys.stderr.write(
            "gateway: GATEWAY_ENV=production needs GATEWAY_JWT_SECRET or GATEWAY_JWT_PUBLIC_KEY\n"
        )
        return 2

    options = uvicorn_options(settings)
    base = f"http://{args.host}:{args.port}"
    if args.workers > 1:
        if settings.dev_mode:  # one ephemeral secret shared by every worker
            os.environ["GATEWAY_JWT_SECRET"] = new_dev_secret()
        if settings.dev_mode:
            token = make_token(
                os.environ["GATEWAY_JWT_SECRET"], "dev", subscribe=["*"], publish=["*"]
            )
            _announce_dev(token, base)
        # Each worker process builds its own app (gateway.workers): same socket, same
        # drain on SIGTERM as a single worker.
        from gateway.workers import APP_FACTORY, run_workers

        config = uvicorn.Config(
            APP_FACTORY, factory=True, host=args.host, port=args.port, **options
        )
        return run_workers(config, args.workers, settings.drain_seconds)

    from gateway.app import create_app

    app = create_app(settings)
    gateway = app.state.gateway
    if gateway.dev_token is not None:
        _announce_dev(gateway.dev_token, base)
    server = DrainingServer(uvicorn.Config(app, host=args.host, port=args.port, **options))
    server.run()
    return 0


def _announce_dev(token: str, base: str) -> None:
    sys.stdout.write(
        "\n  Gateway in DEV MODE (ephemeral secret, demo publisher on).\n"
        f"  Dashboard: {base}/   Chat: {base}/chat\n"
        f"  Dev token (subscribe and publish anywhere, 24 h):\n\n{token}\n\n"
        f"  Try: websocat '{base.replace('http', 'ws')}/ws?token=<token>'\n\n"
    )
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
