"""Baseline (c): python-socketio with its Redis manager, under uvicorn.

Clients emit ``subscribe`` with a channel name and join the room of that name (the
server answers ``subscribed``); publications reach the room through
``AsyncRedisManager``, which is how python-socketio spreads emits over several server
processes - the tool publishes the manager's own message format on its Redis channel.

    python -m loadtest.baselines.socketio_app --port 8004 --redis-url redis://…
"""

from __future__ import annotations

from typing import Any

import socketio  # type: ignore[import-untyped]
import uvicorn
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from loadtest.baselines._cli import parse_args


def create_app(redis_url: str) -> Any:
    manager = socketio.AsyncRedisManager(redis_url)
    sio = socketio.AsyncServer(async_mode="asgi", client_manager=manager)

    @sio.on("subscribe")  # type: ignore[untyped-decorator]
    async def subscribe(sid: str, channel: str) -> None:
        await sio.enter_room(sid, channel)
        await sio.emit("subscribed", channel, to=sid)

    async def healthz(request: Any) -> PlainTextResponse:
        return PlainTextResponse("ok")

    health = Starlette(routes=[Route("/healthz", healthz)])
    return socketio.ASGIApp(sio, other_asgi_app=health)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__, argv)
    uvicorn.run(create_app(args.redis_url), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
