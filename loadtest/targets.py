"""The servers the tool can drive: the gateway and the baselines of ``loadtest/baselines``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from loadtest.dialects import (
    Dialect,
    GatewaySse,
    GatewayWs,
    NchanSse,
    NchanWs,
    PlainSse,
    PlainWs,
    SocketIoWs,
)

PublishKind = Literal["gateway", "redis", "socketio", "nchan"]


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    # ``python -m <module> --port P --redis-url U`` starts it (None: the gateway or Nchan,
    # see servers and nchan).
    module: str | None
    dialects: dict[str, Dialect] = field(default_factory=dict)
    # gateway: HTTP API or the gateway's Redis broker; redis: plain PUBLISH of the payload on
    # the channel; socketio: PUBLISH of a python-socketio manager message (room = channel);
    # nchan: HTTP POST of the payload to a second nginx, Nchan's publisher on the same Redis.
    publish: PublishKind = "redis"

    @property
    def transports(self) -> list[str]:
        return sorted(self.dialects)

    def dialect(self, transport: str) -> Dialect:
        try:
            return self.dialects[transport]
        except KeyError:
            raise ValueError(
                f"{self.name} speaks {', '.join(self.transports)}, not {transport}"
            ) from None


TARGETS: dict[str, Target] = {
    t.name: t
    for t in [
        Target(
            "gateway",
            "this project (python -m gateway), one uvicorn worker",
            None,
            {"ws": GatewayWs(), "sse": GatewaySse()},
            publish="gateway",
        ),
        Target(
            "fastapi_tutorial",
            "FastAPI tutorial pattern: a broadcaster subscription per WebSocket, "
            "await send_text per message",
            "loadtest.baselines.fastapi_tutorial",
            {"ws": PlainWs()},
        ),
        Target(
            "sse_starlette",
            "sse-starlette EventSourceResponse, a broadcaster subscription per stream",
            "loadtest.baselines.sse_starlette_app",
            {"sse": PlainSse()},
        ),
        Target(
            "websockets_broadcast",
            "websockets.broadcast() over one Redis subscription",
            "loadtest.baselines.websockets_broadcast",
            {"ws": PlainWs()},
        ),
        Target(
            "bare_protocol",
            "a bare asyncio.Protocol with httptools and hand-built frames: the floor",
            "loadtest.baselines.bare_protocol",
            {"ws": PlainWs()},
        ),
        Target(
            "socketio_node",
            "Node socket.io 4 (WebSocket transport), one room per channel, fed by a Redis "
            "subscription per channel",
            "loadtest.baselines.socketio_node",
            {"ws": SocketIoWs()},
        ),
        Target(
            "socketio",
            "python-socketio (ASGI, uvicorn) with AsyncRedisManager, one room per channel",
            "loadtest.baselines.socketio_app",
            {"ws": SocketIoWs()},
            publish="socketio",
        ),
        Target(
            "nchan",
            "Nginx with the Nchan module (nchan_redis_pass), one worker process; "
            "published by HTTP POST to a second nginx on the same Redis",
            None,
            {"ws": NchanWs(), "sse": NchanSse()},
            publish="nchan",
        ),
    ]
}
