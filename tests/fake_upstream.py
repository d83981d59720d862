"""A small OpenAI-compatible upstream for the LLM relay tests, served by real uvicorn.

``POST /v1/chat/completions`` streams ``data: {"choices":[{"index":0,"delta":
{"content":…}}]}`` lines with a delay between them, then a chunk with
``finish_reason`` and ``usage``, then ``data: [DONE]``. The request body picks
the behaviour (the relay passes it through, plus ``"stream": true``):

- ``"model"``: ``ok`` (default), ``http-500`` (a text body), ``http-401`` and
  ``http-400`` (OpenAI's JSON error, its message echoing the key it was sent),
  ``http-400-far`` (the same, the key 270 characters in, across where an error is cut),
  ``http-503-endless`` (an error body that never ends), ``stream-error`` (an
  in-stream ``{"error": …}`` line, then silence), ``stall`` (one token,
  then silence longer than any test's timeout), ``no-done`` (the response ends
  without ``[DONE]``), ``bad-json`` (invalid JSON in a data line after two tokens),
  ``drop`` (the connection breaks after two tokens: the chunked body never ends),
  ``odd-shapes`` (valid JSON lines that are not chunks, before every token),
  ``endless-line`` (after the tokens, a data line that never ends: ``ENDLESS_BYTES`` of
  it, then silence);
- ``"fake_tokens"``: the token texts to send (default ``TOKENS``); ``"fake_times"``: how
  many times each is repeated in its token (so that a request names a long token);
- ``"fake_delay"``: seconds before each token (default 0.01);
- ``"fake_burst"``: true to write every token line in one chunk, after one delay;
- ``"fake_usage_bytes"``: a ``usage`` of about that many bytes instead of ``USAGE``.

Every request is recorded as a ``Call`` with its body and headers, and with
events for the moments its client disconnected (``disconnected``: the gateway
closed the upstream request) and the response finished normally (``finished``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from tests.conftest import free_port

TOKENS = ["Hello", ",", " world", "!", " How", " can", " I", " help", "?"]
USAGE = {"prompt_tokens": 5, "completion_tokens": len(TOKENS), "total_tokens": 5 + len(TOKENS)}
STALL_SECONDS = 30.0
ENDLESS_BYTES = 3 << 20  # past the relay's line limit (1 MiB for the default message size)
ODD_SHAPES: list[Any] = [
    {"choices": 7},
    {"choices": [7, None, {"index": 0, "delta": "text"}, {"index": 1, "delta": {"content": "x"}}]},
    {"choices": [{"index": 0, "delta": {"content": 5}}]},
    {"usage": None},
    [1, 2],
    "just a string",
]


def data_line(value: Any) -> bytes:
    return b"data: " + orjson.dumps(value) + b"\n\n"


async def endless_text() -> AsyncIterator[bytes]:
    """``ENDLESS_BYTES`` of an error text, then silence: a body that does not end."""
    for _ in range(ENDLESS_BYTES >> 16):
        yield b"overloaded " * 5957 + b"x" * 9
    await asyncio.sleep(STALL_SECONDS)


def token_chunk(text: str) -> bytes:
    return data_line(
        {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
        }
    )


@dataclass
class Call:
    body: dict[str, Any]
    headers: dict[str, str]
    sent: list[str] = field(default_factory=list)  # token texts written so far
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)
    disconnected_at: float | None = None
    finished: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def scenario(self) -> str:
        return str(self.body.get("model", "ok"))


class CompletionStream(Response):
    """Writes the scenario's chunks while watching for the client's disconnect.

    A raw ASGI response rather than a generator, so that the disconnect is seen
    (and recorded) at once even while the stream is sleeping between tokens.
    """

    def __init__(self, call: Call) -> None:
        super().__init__(status_code=200)
        self.call = call
        self.raw_headers = [
            (b"content-type", b"text/event-stream"),
            (b"cache-control", b"no-cache"),
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        writer = asyncio.create_task(self._write(send))
        watcher = asyncio.create_task(self._watch(receive))
        try:
            await asyncio.wait({writer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            writer.cancel()
            watcher.cancel()
            for task in (writer, watcher):
                with contextlib.suppress(BaseException):
                    await task

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.call.disconnected_at = time.monotonic()
        self.call.disconnected.set()

    async def _write(self, send: Send) -> None:
        call, body = self.call, self.call.body
        tokens = [str(t) for t in body.get("fake_tokens", TOKENS)]
        times = body.get("fake_times", [1] * len(tokens))
        tokens = [text * count for text, count in zip(tokens, times, strict=True)]
        delay = float(body.get("fake_delay", 0.01))
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})

        async def chunk(data: bytes) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": True})

        if call.scenario == "stall":
            tokens = tokens[:1]
        elif call.scenario in ("bad-json", "drop"):
            tokens = tokens[:2]
        if body.get("fake_burst"):
            await asyncio.sleep(delay)
            await chunk(b"".join(token_chunk(text) for text in tokens))
            call.sent.extend(tokens)
            tokens = []
        for text in tokens:
            await asyncio.sleep(delay)
            if call.scenario == "odd-shapes":
                for odd in ODD_SHAPES:
                    await chunk(data_line(odd))
            await chunk(token_chunk(text))
            call.sent.append(text)
        if call.scenario == "stall":
            await asyncio.sleep(STALL_SECONDS)
        elif call.scenario == "bad-json":
            await chunk(b'data: {"choices": [{"index": 0, "delta": {"content": "x"\n\n')
            await asyncio.sleep(STALL_SECONDS)  # the relay must stop at the bad line
        elif call.scenario == "stream-error":
            await chunk(data_line({"error": {"message": "content filtered", "code": 7}}))
            await asyncio.sleep(STALL_SECONDS)
        elif call.scenario == "endless-line":
            await chunk(b'data: {"choices": [{"index": 0, "delta": {"content": "')
            for _ in range(ENDLESS_BYTES >> 16):
                await chunk(b"x" * (1 << 16))
            await asyncio.sleep(STALL_SECONDS)
        elif call.scenario == "drop":
            # The response is left incomplete: uvicorn closes the connection without the
            # chunked body's terminator (and logs that the app did not complete it).
            return
        else:
            final = {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                "usage": {"note": "x" * body["fake_usage_bytes"]}
                if "fake_usage_bytes" in body
                else USAGE,
            }
            await chunk(data_line(final))
            if call.scenario != "no-done":
                await chunk(b"data: [DONE]\n\n")
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        call.finished.set()


class FakeUpstream:
    """The app and what it saw. ``url`` is the base URL to configure (``…/v1``)."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.url = ""
        self.app = Starlette(
            routes=[Route("/v1/chat/completions", self.completions, methods=["POST"])]
        )

    async def completions(self, request: Request) -> Response:
        body = orjson.loads(await request.body())
        call = Call(body=body, headers={k.lower(): v for k, v in request.headers.items()})
        self.calls.append(call)
        if call.scenario == "http-500":
            call.finished.set()
            return Response("model overloaded, try later", status_code=500)
        key = call.headers.get("authorization", "").removeprefix("Bearer ")
        if call.scenario in ("http-401", "http-400", "http-400-far"):  # the key echoed back
            call.finished.set()
            said = f"Incorrect API key provided: {key}"
            if call.scenario == "http-400":
                said = f"This model's maximum context length is 8 tokens (key {key})"
            elif call.scenario == "http-400-far":  # the key across where a message is cut
                said = f"{'context too long; ' * 15}(key {key})"
            return Response(
                orjson.dumps({"error": {"message": said, "type": "invalid_request_error"}}),
                status_code=int(call.scenario[5:8]),
                media_type="application/json",
            )
        if call.scenario == "http-503-endless":  # an error body that never ends
            call.finished.set()
            return StreamingResponse(endless_text(), status_code=503)
        return CompletionStream(call)

    @property
    def last(self) -> Call:
        assert self.calls, "the fake upstream got no request"
        return self.calls[-1]


@contextlib.asynccontextmanager
async def serve_app(app: Any, what: str) -> AsyncIterator[str]:
    """Serve the ASGI ``app`` with uvicorn on a free port in the current event loop; its
    base URL. ``what`` names it in start-up errors."""
    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_config=None,
        lifespan="off",
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    deadline = time.monotonic() + 10
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError(f"{what} exited during start-up")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not start")
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), 5)
        if not task.done():
            server.force_exit = True
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


@contextlib.asynccontextmanager
async def serve_fake_upstream() -> AsyncIterator[FakeUpstream]:
    """Run a ``FakeUpstream`` with uvicorn on a free port in the current event loop."""
    upstream = FakeUpstream()
    async with serve_app(upstream.app, "fake upstream") as url:
        upstream.url = f"{url}/v1"
        yield upstream
