"""LLM token streams: streamed publish (NDJSON), relays of an upstream's tokens, and the
dev-mode fake upstream. ``install`` adds them to an app."""

from __future__ import annotations

import httpx
from fastapi import FastAPI

from gateway.llm import routes
from gateway.llm.fake import FakeLLMTransport
from gateway.llm.relay import RelayManager
from gateway.llm.upstreams import Upstream, load_upstreams
from gateway.runtime import Gateway


def install(app: FastAPI, gateway: Gateway) -> None:
    """The routes, and the relays (started and closed with the gateway)."""
    settings = gateway.settings
    dev = gateway.dev_secret is not None
    upstreams = load_upstreams(settings.llm_upstreams, allow_fake=dev)
    mounts: dict[str, httpx.AsyncBaseTransport] = {}
    if dev:  # the /llm demo works with no network and no key
        mounts["fake://"] = FakeLLMTransport()
        upstreams.setdefault("demo", Upstream("demo", "fake://demo/v1", timeout=10))
    # A relay holds its connection for the whole answer: no cap on how many at once
    # (httpx's default, 100, held the 101st relay until another ended).
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=20)
    client = httpx.AsyncClient(mounts=mounts, follow_redirects=False, limits=limits)
    relays = RelayManager(
        gateway.hub,
        upstreams,
        idle_cancel=settings.llm_idle_cancel,
        client=client,
        max_bytes=settings.max_message_bytes,
    )
    app.state.relays = relays
    app.include_router(routes.router)
    gateway.add_feature(relays)
