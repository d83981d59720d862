"""A built-in OpenAI-compatible upstream for the dev-mode ``/llm`` demo: no network, no key.

It is an httpx transport mounted on ``fake://``: the relay talks to it through
the same httpx client and the same streaming parser as to a real upstream.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import httpx
import orjson

ANSWER = (
    "Here is how this answer reaches you: the gateway called an upstream with streaming on, "
    "and published every token it received into a channel. Your browser subscribed to that "
    "channel, so each token shows up as soon as it exists. Reload the page in the middle of "
    "this sentence and it picks up from history, with nothing lost and nothing repeated. "
    "Close the tab and, after a few idle seconds, the gateway cancels the upstream request, "
    "so nobody pays for tokens that nobody reads."
)


class FakeStream(httpx.AsyncByteStream):
    def __init__(self, prompt: str, delay: float) -> None:
        self.prompt = prompt
        self.delay = delay

    async def __aiter__(self) -> AsyncIterator[bytes]:
        created = int(time.time())
        words = [f"You asked: {self.prompt[:200]!r}. "] if self.prompt else []
        words += [w + " " for w in ANSWER.split(" ")]
        for word in words:
            await asyncio.sleep(self.delay)
            chunk = {
                "id": "fake",
                "object": "chat.completion.chunk",
                "created": created,
                "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}],
            }
            yield b"data: " + orjson.dumps(chunk) + b"\n\n"
        done = {
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": len(self.prompt.split()), "completion_tokens": len(words)},
        }
        yield b"data: " + orjson.dumps(done) + b"\n\ndata: [DONE]\n\n"


class FakeLLMTransport(httpx.AsyncBaseTransport):
    def __init__(self, delay: float = 0.06) -> None:
        self.delay = delay

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = orjson.loads(await request.aread() or b"{}")
        messages = body.get("messages") or [{}]
        last = messages[-1] if isinstance(messages, list) and messages else {}
        prompt = str(last.get("content", "")) if isinstance(last, dict) else ""
        return httpx.Response(
            200,
            headers={"content-type": "text/event-stream"},
            stream=FakeStream(prompt, self.delay),
        )
