"""``python -m gateway`` / ``gateway``: run the gateway under uvicorn.

In dev mode (no key configured) this prints a ready-to-use dev token on
stdout; the token is deliberately never given to a logger. With the demo on, and
``GATEWAY_HOOKS`` not set, the gateway's hooks are the chat demo's backend on this same
server (gateway.demo_backend).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys

import uvicorn

from auth.tokens import make_token, new_dev_secret
from gateway import compiled
from gateway.demo_backend import hooks_config
from gateway.server.draining import DrainingServer
from gateway.server.heap import prepare_heap
from gateway.server.options import ServerChoice, server_choice, uvicorn_options
from gateway.settings import DEV_WARNING, Settings

logger = logging.getLogger("gateway.server")


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

    choice = server_choice(settings)
    options = uvicorn_options(settings, choice)
    base = f"http://{args.host}:{args.port}"
    if args.workers > 1:
        if settings.dev_mode:  # one ephemeral secret shared by every worker
            os.environ["GATEWAY_JWT_SECRET"] = new_dev_secret()
        if settings.dev_mode:
            token = make_token(
                os.environ["GATEWAY_JWT_SECRET"], "dev", subscribe=["*"], publish=["*"]
            )
            _announce_dev(token, base, settings.demo)
        # Each worker process builds its own app (gateway.server.workers): same socket,
        # same drain on SIGTERM as a single worker.
        from gateway.server.workers import APP_FACTORY, run_workers

        config = uvicorn.Config(
            APP_FACTORY, factory=True, host=args.host, port=args.port, **options
        )
        _log_choice(choice)  # once uvicorn's Config has set up logging
        if settings.dev_mode:  # (the workers are given the secret: not in dev mode there)
            logger.warning(DEV_WARNING)
            _warn_if_exposed(args.host)
        return run_workers(config, args.workers, settings.drain_seconds)

    from gateway.app import create_app

    demo_hooks = _demo_hooks(settings, args.host, args.port)
    if demo_hooks is not None:
        settings = settings.model_copy(update={"hooks": demo_hooks})
    app = create_app(settings)
    gateway = app.state.gateway
    if gateway.dev_token is not None:
        _announce_dev(gateway.dev_token, base, settings.demo)
    server = DrainingServer(uvicorn.Config(app, host=args.host, port=args.port, **options))
    _log_choice(choice)
    if settings.dev_mode:
        _warn_if_exposed(args.host)
    if demo_hooks is not None:
        logger.info("dev mode: GATEWAY_HOOKS is the chat demo's backend: %s", demo_hooks)
    prepare_heap()
    server.run()
    return 0


def _demo_hooks(settings: Settings, host: str, port: int) -> str | None:
    """Dev mode with the demo: ``GATEWAY_HOOKS`` for the chat demo's backend on this server,
    unless the user set the variable (even to ``{}``: no hooks)."""
    if not (settings.dev_mode and settings.demo) or "GATEWAY_HOOKS" in os.environ or not port:
        return None
    return hooks_config(_local_url(host, port))


def _local_url(host: str, port: int) -> str:
    """Where this machine reaches a server bound to ``host`` (a wildcard: on loopback)."""
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _warn_if_exposed(host: str) -> None:
    """Dev mode mints tokens for whoever asks: say so when more than this machine can."""
    try:
        local = ipaddress.ip_address(host or "0.0.0.0").is_loopback
    except ValueError:
        local = host == "localhost"
    if not local:
        logger.warning(
            "dev mode listening on %s: anyone who reaches this port can take a token for "
            "anything (/dev/token) and use /admin. Set GATEWAY_JWT_SECRET (and "
            "GATEWAY_ENV=production) before serving a network.",
            host,
        )


def _log_choice(choice: ServerChoice) -> None:
    for fallback in choice.fallbacks:
        logger.warning("%s", fallback)
    logger.info("%s", choice.summary)
    logger.info("%s", compiled.summary())


def _announce_dev(token: str, base: str, demo: bool) -> None:
    sys.stdout.write(
        f"\n  Gateway in DEV MODE (ephemeral secret, demo publisher {'on' if demo else 'off'}).\n"
        f"  Dashboard: {base}/   Chat: {base}/chat\n"
        f"  Dev token (subscribe and publish anywhere, 24 h):\n\n{token}\n\n"
        f"  Try: websocat '{base.replace('http', 'ws')}/ws?token=<token>'\n\n"
    )
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
