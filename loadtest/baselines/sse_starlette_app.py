"""Baseline (a), SSE twin: sse-starlette's ``EventSourceResponse`` over broadcaster.

Each stream is an async generator holding its own broadcaster subscription and yielding
one event per message, as the sse-starlette and broadcaster READMEs show.

    python -m loadtest.baselines.sse_starlette_app --port 8002 --redis-url redis://…
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from broadcaster import Broadcast
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse
from sse_starlette.sse import EventSourceResponse

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

    @app.get("/sse")
    async def stream(channel: str = "bench") -> EventSourceResponse:
        async def events() -> AsyncIterator[dict[str, Any]]:
            async with broadcast.subscribe(channel=channel) as subscriber:
                yield {"event": "ready", "data": channel}
                async for event in subscriber:  # type: ignore[union-attr]
                    if event is None:  # unsubscribed
                        break
                    yield {"data": event.message}

        return EventSourceResponse(events())

    return app


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__, argv)
    uvicorn.run(create_app(args.redis_url), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
