"""The per-app runtime: settings, verifier, hub, metrics, connection accounting, drain."""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections import Counter
from typing import ClassVar

import httpx

from auth import PatternSet, TokenVerifier
from auth.tokens import make_token, new_dev_secret
from channels.broker import BrokerOptions, create_backend
from channels.hub import Hub
from channels.session import Session
from gateway.errors import CloseCode
from gateway.llm.fake import FakeLLMTransport
from gateway.llm.relay import RelayManager
from gateway.llm.upstreams import Upstream, load_upstreams
from gateway.metrics import Metrics
from gateway.settings import Settings

logger = logging.getLogger(__name__)


class Gateway:
    # Every runtime in this process, so the server's SIGTERM handling can drain them.
    instances: ClassVar[weakref.WeakSet[Gateway]] = weakref.WeakSet()

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.dev_token: str | None = None
        secret = settings.jwt_secret
        if settings.dev_mode:
            if settings.env == "production":
                raise RuntimeError(
                    "GATEWAY_ENV=production needs GATEWAY_JWT_SECRET or GATEWAY_JWT_PUBLIC_KEY"
                )
            secret = new_dev_secret()
            self.dev_secret: str | None = secret
            logger.warning(
                "no GATEWAY_JWT_SECRET or GATEWAY_JWT_PUBLIC_KEY: dev mode with an ephemeral "
                "secret; tokens die with this process. Never run this in production."
            )
            self.dev_token = make_token(secret, "dev", subscribe=["*"], publish=["*"])
        else:
            self.dev_secret = None
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
            ),
        )
        self.hub = Hub(
            backend,
            presence_enabled=PatternSet(settings.presence_patterns),
            presence_ttl=settings.presence_ttl,
            max_channels_per_session=settings.max_channels_per_connection,
        )
        upstreams = load_upstreams(settings.llm_upstreams, allow_fake=self.dev_secret is not None)
        mounts: dict[str, httpx.AsyncBaseTransport] = {}
        if self.dev_secret is not None:  # the /llm demo works with no network and no key
            mounts["fake://"] = FakeLLMTransport()
            upstreams.setdefault("demo", Upstream("demo", "fake://demo/v1", timeout=10))
        self.http = httpx.AsyncClient(mounts=mounts, follow_redirects=False)
        self.relays = RelayManager(
            self.hub, upstreams, idle_cancel=settings.llm_idle_cancel, client=self.http
        )
        self.connections: Counter[str] = Counter({"websocket": 0, "sse": 0})
        self.slow_closes: Counter[str] = Counter({"websocket": 0, "sse": 0})
        self.draining = False
        self._drain_deadline: float | None = None  # loop time; set by the first drain()
        self.metrics = Metrics(self)
        self.hub.observe_latency = self.metrics.latency.observe
        Gateway.instances.add(self)

    def broker_reconnects(self) -> int:
        return self.hub.reconnects

    def origin_allowed(self, origin: str | None) -> bool:
        """No ``Origin`` header means not a browser: allowed."""
        return origin is None or "*" in self.origins or origin in self.origins

    @property
    def at_capacity(self) -> bool:
        return sum(self.connections.values()) >= self.settings.max_connections

    def opened(self, session: Session) -> None:
        self.connections[session.transport_name] += 1
        self.hub.register(session)

    async def closed(self, session: Session) -> None:
        """The session leaves every channel and stops counting. Idempotent."""
        if session not in self.hub.sessions:
            return
        self.connections[session.transport_name] -= 1
        if session.slow:
            self.slow_closes[session.transport_name] += 1
        await self.hub.unregister(session)

    async def start(self) -> None:
        await self.hub.start()

    async def drain(self, timeout: float) -> None:
        """Report not ready, ask every session to close (1012 / end of stream), wait for them.

        One budget for the whole shutdown: the first call fixes the deadline (now +
        ``timeout``) and later calls (``python -m gateway`` drains on SIGTERM, then the app's
        lifespan shutdown drains again) wait only for what is left of it. Sessions still
        registered at the deadline are stuck in a write to a client that stopped reading:
        their in-flight write is abandoned (``Session.abort``) so they cannot hold the exit.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if self._drain_deadline is not None:
            deadline = min(deadline, self._drain_deadline)
        self._drain_deadline = deadline
        self.draining = True
        sessions = list(self.hub.sessions)
        if sessions:
            logger.info("draining %d connections", len(sessions))
        for session in sessions:
            session.close(*CloseCode.SERVICE_RESTART)
        if not self.hub.sessions:
            return
        try:
            await asyncio.wait_for(self.hub.wait_idle(), max(0.0, deadline - loop.time()))
        except TimeoutError:
            stuck = list(self.hub.sessions)
            logger.warning(
                "%d connections still open after the drain: abandoning their writes", len(stuck)
            )
            for session in stuck:
                if session.abort is not None:
                    session.abort()

    async def close(self) -> None:
        await self.relays.close()
        await self.http.aclose()
        await self.hub.close()
