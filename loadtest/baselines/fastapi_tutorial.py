"""Baseline (a): the FastAPI tutorial pattern for a WebSocket feed.

One ``broadcaster`` subscription per connection, and the handler awaits ``send_text``
for every message it takes from its subscriber queue - what the FastAPI docs and the
broadcaster README show. broadcaster reads Redis pub/sub in one listener task and puts
every message into one unbounded ``asyncio.Queue`` per connection.

    python -m loadtest.baselines.fastapi_tutorial --port 8001 --redis-url redis://…
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from broadcaster import Broadcast
from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from fastapi.responses import PlainTextResponse

from loadtest.baselines._cli import keep_listening, parse_args


def create_app(redis_url: str) -> FastAPI:
    broadcast = Broadcast(redis_url)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await broadcast.connect()
        async with keep_listening(broadcast):
            yield
        await broadcast.disconnect()

    app = FastAPI(lifespan=lifespan)

    @app.get("/healthz")
    async def healthz() -> PlainTextResponse:
        return PlainTextResponse("ok")

    @app.websocket("/ws")
    async def feed(websocket: WebSocket, channel: str = "bench") -> None:
        await websocket.accept()
        try:
            async with broadcast.subscribe(channel=channel) as subscriber:
                await websocket.send_text('{"ready": "%s"}' % channel)  # noqa: UP031
                async for event in subscriber:  # type: ignore[union-attr]
                    if event is None:  # unsubscribed
                        break
                    await websocket.send_text(event.message)
        except WebSocketDisconnect:
            pass

    return app


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__, argv)
    uvicorn.run(create_app(args.redis_url), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
