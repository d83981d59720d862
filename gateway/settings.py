"""Settings, read from ``GATEWAY_*`` environment variables (pydantic-settings).

Every limit the gateway enforces is here; README.md has the table.
Comma-separated lists stay strings in the environment (as the contract
writes them) and are split by the properties below.
"""

from __future__ import annotations

from typing import Any, Literal

import orjson
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def json_object(raw: str, setting: str, of: str) -> dict[str, Any]:
    """A setting holding a JSON object (``of`` says of what, for the error); ValueError
    naming ``setting`` when it is not one."""
    try:
        config = orjson.loads(raw or "{}")
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"{setting} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{setting} must be a JSON object of {of}")
    return config


def split_csv(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


DEV_WARNING = (
    "no GATEWAY_JWT_SECRET or GATEWAY_JWT_PUBLIC_KEY: dev mode with an ephemeral secret; "
    "tokens die with this process. Never run this in production."
)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GATEWAY_", extra="ignore")

    env: Literal["development", "production"] = "development"
    broker_url: str = "memory://"
    # Namespace of every Redis key and pub/sub topic (several gateways can share one Redis).
    broker_prefix: str = Field("gw", pattern=r"^[^{}]+$")
    jwt_secret: str = ""
    jwt_public_key: str = ""
    jwt_leeway: float = Field(5.0, ge=0, le=5)

    history_size: int = Field(100, ge=0)
    # Publications each worker keeps of every channel it relays, for clients resuming
    # from a few behind (no history read); memory: this x payload x relayed channels.
    resume_window: int = Field(64, ge=0)
    history_ttl: float = Field(300.0, gt=0)
    history_meta_ttl: float = Field(86400.0, gt=0)

    max_connections: int = Field(100_000, ge=1)
    max_message_bytes: int = Field(65_536, ge=64)
    max_bad_frames: int = Field(3, ge=1)
    max_channels_per_connection: int = Field(128, ge=1)
    client_queue_bytes: int = Field(1_048_576, ge=1024)
    # A write that waits longer than this for a client's socket: a slow consumer too.
    send_timeout: float = Field(10.0, gt=0)
    client_publish_rate: float = Field(0.0, ge=0)
    api_publish_rate: float = Field(0.0, ge=0)
    max_broadcast_channels: int = Field(1000, ge=1)
    # How long an API publish's ``idempotency_key`` is remembered per channel.
    idempotency_ttl: float = Field(300.0, gt=0)
    allowed_origins: str = "*"

    ping_interval: float = Field(20.0, gt=0)
    ping_timeout: float = Field(20.0, gt=0)
    sse_heartbeat: float = Field(15.0, gt=0)
    sse_retry_ms: int = Field(2000, ge=0)
    # True: the gateway's own uvicorn protocols (pushes straight to the socket, connections
    # detached from their ASGI call once open); false: uvicorn's stock protocols, every
    # write through ASGI (e.g. behind a body-rewriting middleware). gateway.server.options.
    raw_writes: bool = True
    # Seconds a connection may take to send a whole request head (from when it opened, or
    # from a request's first byte after a response): then 408 and closed. With the
    # gateway's own protocols only (gateway.server.headwait).
    request_head_timeout: float = Field(10.0, gt=0)
    # The listen queue: connections the kernel has completed that no worker has accepted
    # yet. When every client of a pod reconnects at once, a full queue drops their SYNs
    # and each retries 1 s later (then 3 s, 7 s): with uvicorn's 2048, a fifth of 6,000
    # clients arriving at once did (docs/benchmarks.md, "Every client at once").
    # The kernel caps it at net.core.somaxconn (4096 by default since Linux 5.4).
    listen_backlog: int = Field(65535, ge=1)

    presence_channels: str = "chat:*"
    presence_ttl: float = Field(30.0, gt=0)

    drain_seconds: float = Field(20.0, ge=0)
    llm_idle_cancel: float = Field(10.0, gt=0)
    llm_upstreams: str = "{}"
    # POST /api/streams: a chat request (the whole conversation) is not a publication.
    llm_max_request_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    # Backend hooks deciding subscriptions and client publications (gateway.hooks).
    hooks: str = "{}"

    demo: bool = True
    # The admin page and its API (gateway.admin): open in dev mode; with a key configured,
    # off (404) unless this is set, then every admin request needs it as a bearer token.
    admin_token: str = Field("", repr=False)
    log_level: str = "info"
    # One line per HTTP request and per accepted WebSocket (uvicorn's access log); off, a
    # reconnect storm writes no line per client.
    access_log: bool = True

    @field_validator("admin_token")
    @classmethod
    def _long_enough(cls, value: str) -> str:
        if value and len(value) < 16:
            raise ValueError("GATEWAY_ADMIN_TOKEN must be at least 16 characters")
        return value

    @property
    def origins(self) -> list[str]:
        return split_csv(self.allowed_origins)

    @property
    def presence_patterns(self) -> list[str]:
        return split_csv(self.presence_channels)

    @property
    def dev_mode(self) -> bool:
        """No key configured: an ephemeral secret is made and a dev token printed."""
        return not (self.jwt_secret or self.jwt_public_key)
