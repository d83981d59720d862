"""The per-app runtime: settings, token verifier, hub, connection accounting, metrics, drain.

Features (the LLM relays, the demo) are not wired here: each installs itself on the
app (``gateway.app``) and hands the runtime what has to start and stop with it
(``add_feature``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol

from auth import Claims, PatternSet, TokenVerifier
from auth.tokens import make_token, new_dev_secret
from channels.backend_url import create_backend
from channels.broker import BrokerOptions
from channels.hub import Hub
from channels.log_throttle import LogThrottle
from channels.session import Session, Transport
from gateway.connections import Connections
from gateway.errors import CloseCode
from gateway.hooks import Hooks, load_hooks
from gateway.metrics import Metrics
from gateway.ratelimit import RateLimiter
from gateway.settings import DEV_WARNING, Settings

logger = logging.getLogger(__name__)
# When a network path stalls, many clients stop reading at once: a line a while.
_SLOW_CONSUMERS = LogThrottle(logger)

# Seconds before the shutdown's deadline (GATEWAY_DRAIN_SECONDS) that a request still
# reading its body (``Gateway.body_readers``) is stopped, for its answer to go out.
BODY_MARGIN = 1.0


class Feature(Protocol):
    """Something installed on the app that runs while the gateway does."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class Gateway:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.dev_token: str | None = None
        self.dev_secret: str | None = None
        secret = settings.jwt_secret
        if settings.dev_mode:
            if settings.env == "production":
                raise RuntimeError(
                    "GATEWAY_ENV=production needs GATEWAY_JWT_SECRET or GATEWAY_JWT_PUBLIC_KEY"
                )
            secret = self.dev_secret = new_dev_secret()
            logger.warning(DEV_WARNING)
            self.dev_token = make_token(secret, "dev", subscribe=["*"], publish=["*"])
        self.verifier = TokenVerifier(
            secret=secret, public_key=settings.jwt_public_key, leeway=settings.jwt_leeway
        )
        self.origins = settings.origins
        backend = create_backend(
            settings.broker_url,
            BrokerOptions(
                history_size=settings.history_size,
                history_ttl=settings.history_ttl,
                history_meta_ttl=settings.history_meta_ttl,
                presence_ttl=settings.presence_ttl,
                key_prefix=settings.broker_prefix,
                idempotency_ttl=settings.idempotency_ttl,
            ),
        )
        self.hub = Hub(
            backend,
            presence_enabled=PatternSet(settings.presence_patterns),
            presence_ttl=settings.presence_ttl,
            max_channels_per_session=settings.max_channels_per_connection,
            recent_size=min(settings.resume_window, settings.history_size),
        )
        self.connections = Connections(settings.max_connections)
        self.metrics = Metrics(self.hub, self.connections)
        # One bound method for the hub and every session (not one made per connection).
        self._observe_latency = self.hub.observe_latency = self.metrics.latency.observe
        metrics = self.metrics
        self.hooks = Hooks(
            load_hooks(settings.hooks),
            metrics.hook_seconds,
            metrics.hook_outcomes,
            max_channels=settings.max_channels_per_connection,
        )
        # Whether a subscribe or connect hook is configured at all: a connect asks these
        # (native attributes) before it asks the hooks themselves (an interpreted call).
        self.subscribe_hooked = "subscribe" in self.hooks.hooks
        self.connect_hooked = "connect" in self.hooks.hooks
        self.draining = False
        # GATEWAY_API_PUBLISH_RATE's token buckets, per token ``sub`` (``deps.ApiRateLimit``)
        self.api_buckets: dict[str, RateLimiter] = {}
        self._features: list[Feature] = []
        self._drain: asyncio.Task[None] | None = None
        # Requests that read their body for long (a streamed publish), each's way to be
        # ended with an answer before the server's shutdown deadline cuts it (``drain``).
        self.body_readers: set[Callable[[], None]] = set()

    def add_feature(self, feature: Feature) -> None:
        """Start ``feature`` after the hub, close it before (in reverse order of adding)."""
        self._features.append(feature)

    def origin_allowed(self, origin: str | None) -> bool:
        """No ``Origin`` header means not a browser: allowed."""
        return origin is None or "*" in self.origins or origin in self.origins

    def new_session(
        self,
        transport: Transport,
        claims: Claims,
        transport_name: str,
        client_id: str | None = None,
    ) -> Session:
        """A session for a connection holding ``claims``, with the settings' limits (and
        ``client_id``: the one a connect hook was told, if it was)."""
        settings = self.settings
        return Session(
            transport,
            client_id=client_id,
            user=claims.user,
            info=claims.info,
            max_queue_bytes=settings.client_queue_bytes,
            send_timeout=settings.send_timeout,
            transport_name=transport_name,
            observe_latency=self._observe_latency,
        )

    def opened(self, session: Session) -> None:
        self.connections.opened(session.transport_name)
        self.hub.register(session)

    def closed_now(self, session: Session) -> bool:
        """``closed`` when the hub can forget the session at once (``Hub.unregister_now``);
        False, with nothing done, when ``closed`` must be awaited."""
        if session not in self.hub.sessions:
            return True
        if not self.hub.unregister_now(session):
            return False
        self._count_closed(session)
        return True

    async def closed(self, session: Session) -> None:
        """The session leaves every channel and stops counting. Idempotent."""
        if self.closed_now(session):
            return
        self._count_closed(session)
        await self.hub.unregister(session)

    def _count_closed(self, session: Session) -> None:
        slow = session.slow
        self.connections.closed(session.transport_name, slow=slow, dropped=session.dropped)
        if slow:
            _SLOW_CONSUMERS.info(
                "closed a slow consumer: %s (%d queued messages dropped)", session, session.dropped
            )

    async def start(self) -> None:
        await self.hub.start()
        for feature in self._features:
            await feature.start()

    async def drain(self) -> None:
        """Report not ready, ask every session to close (1012 / end of stream), and wait
        for them up to ``GATEWAY_DRAIN_SECONDS``.

        It runs once: the server calls it when it starts shutting down (``python -m
        gateway``, before uvicorn closes connections), the lifespan's end calls it again
        (for any other server), and every caller waits for that one run. Sessions still
        open at the deadline are stuck writing to a client that stopped reading: their
        write is abandoned (``Session.abort``) so that they cannot hold the exit.
        """
        if self._drain is None:
            self._drain = asyncio.create_task(self._drain_sessions(), name="drain")
        await asyncio.shield(self._drain)

    async def _drain_sessions(self) -> None:
        self.draining = True
        # A second before the server's deadline (it cancels what still runs, with no
        # answer), requests still reading a body stop and say what they did.
        later = max(0.0, self.settings.drain_seconds - BODY_MARGIN)
        asyncio.get_running_loop().call_later(later, self._stop_body_readers)
        sessions = list(self.hub.sessions)
        logger.info("draining: closing %d connections (1012 / end of stream)", len(sessions))
        for session in sessions:
            session.close(CloseCode.SERVICE_RESTART)
        started = asyncio.get_running_loop().time()
        try:
            await asyncio.wait_for(self.hub.wait_idle(), self.settings.drain_seconds)
            waited = asyncio.get_running_loop().time() - started
            logger.info("drained: every connection closed in %.2fs", waited)
        except TimeoutError:
            stuck = list(self.hub.sessions)
            logger.warning(
                "%d connections still open after the drain: abandoning their writes", len(stuck)
            )
            for session in stuck:
                session.abort()

    def _stop_body_readers(self) -> None:
        for stop in list(self.body_readers):
            stop()

    async def close(self) -> None:
        for feature in reversed(self._features):
            try:
                await feature.close()
            except Exception:
                logger.exception("closing %r failed", feature)
        await self.hooks.close()
        await self.hub.close()
