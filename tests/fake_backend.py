"""An application backend answering the gateway's hooks, served by real uvicorn.

``POST /hooks/subscribe`` and ``POST /hooks/publish`` record each request
(``FakeBackend.calls``) and answer by the channel's name: the part after the
first ``:`` up to a ``.`` is the behaviour (``chat:rewrite.1`` → ``rewrite``):

- ``allow`` / ``ok`` / anything unknown: ``{"result": "allow"}`` (subscribe) or
  ``{"result": "accept"}`` (publish);
- ``refuse``: a refusal with the message ``"not in this room"``;
- ``refusecode``: a refusal with ``"code": "not_found"``; ``refusebogus``: with an
  unknown code;
- ``rewrite``: publish accepted with ``{"data": {"rewritten": <the data>}}``;
- ``hang``: no answer until ``release`` is set (``pending`` counts the waiting calls);
- ``http500``: a 500; ``badjson``: a 200 with a body that is not JSON;
  ``unknown``: ``{"result": "maybe"}``;
- ``info`` (subscribe): allowed with ``{"info": INFO}``; ``huge`` (publish): accepted
  with data of ``HUGE`` bytes; ``deep``: allowed (accepted, ok) with ``data`` and
  ``info`` nested 300 levels deep, which orjson reads but does not write; ``edge``:
  the same 253 levels deep, a reply orjson writes whole (254 levels) but not the
  client's reply holding it one level deeper;
``toobig``: 1.06 MiB streamed, no content-length.

``POST /hooks/rpc`` does the same by the method's name (``rpc:echo`` → ``echo``); an
allowed call answers ``{"result": "ok", "data": {"echo": <data>, "user": <user>}}``.

``POST /hooks/connect`` reads the request's cookies: ``session=<user>`` is the user it
allows (with ``info`` ``{"name": <user>}`` and ``room:*`` to subscribe and publish);
without it a connection with a token is allowed as it is, one without is refused
``unauthorized`` (``LOGIN``). ``hook=<behaviour>`` as above (``refuse``, ``hang``,
``http500``, ``badjson``, ``unknown``), or ``nouser`` (an allow without a user),
``longrefusal`` (a refusal whose message is 300 bytes); ``channels=a|b`` adds
server-side channels; ``ttl=<s>`` an ``expire_at`` that many seconds ahead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from tests.fake_upstream import serve_app

REFUSAL = "not in this room"
LOGIN = "please log in"
INFO = {"role": "moderator", "unread": 3}
HUGE = 70_000


@dataclass
class HookCall:
    hook: str
    body: dict[str, Any]


def nested(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


def behaviour(channel: str) -> str:
    return channel.partition(":")[2].partition(".")[0]


class FakeBackend:
    def __init__(self) -> None:
        self.calls: list[HookCall] = []
        self.pending = 0
        self.release = asyncio.Event()
        self.url = ""
        self.app = Starlette(
            routes=[
                Route("/hooks/subscribe", self.subscribe, methods=["POST"]),
                Route("/hooks/publish", self.publish, methods=["POST"]),
                Route("/hooks/rpc", self.rpc, methods=["POST"]),
                Route("/hooks/connect", self.connect, methods=["POST"]),
            ]
        )

    def hooks(self, **timeouts: float) -> str:
        """``GATEWAY_HOOKS`` for this backend: subscribe and publish on ``chat:*`` and
        ``private:*``, rpc for ``rpc:*``; connect too when given a timeout."""
        config: dict[str, Any] = {
            name: {
                "url": f"{self.url}/hooks/{name}",
                "channels": ["chat:*", "private:*"],
                "timeout": timeouts.get(name, 5),
            }
            for name in ("subscribe", "publish")
        }
        config["rpc"] = {
            "url": f"{self.url}/hooks/rpc",
            "methods": ["rpc:*"],
            "timeout": timeouts.get("rpc", 5),
        }
        if "connect" in timeouts:
            config["connect"] = self.connect_hook(timeout=timeouts["connect"])
        return orjson.dumps(config).decode()

    def connect_hook(self, **options: Any) -> dict[str, Any]:
        return {"url": f"{self.url}/hooks/connect", **options}

    def calls_of(self, hook: str, channel: str | None = None) -> list[dict[str, Any]]:
        return [
            c.body
            for c in self.calls
            if c.hook == hook and (channel is None or c.body.get("channel") == channel)
        ]

    async def subscribe(self, request: Request) -> Response:
        return await self._answer("subscribe", request, {"result": "allow"})

    async def publish(self, request: Request) -> Response:
        return await self._answer("publish", request, {"result": "accept"})

    async def rpc(self, request: Request) -> Response:
        return await self._answer("rpc", request, {"result": "ok"})

    async def connect(self, request: Request) -> Response:
        body = orjson.loads(await request.body())
        cookies = body["cookies"]
        user = cookies.get("session")
        kind = cookies.get("hook", "allow")
        reply: dict[str, Any] = {"result": "allow"}
        if user:
            reply.update(user=user, info={"name": user}, subscribe=["room:*"], publish=["room:*"])
        elif body["claims"] is None and kind == "allow":
            reply = {"result": "refuse", "code": "unauthorized", "message": LOGIN}
        if cookies.get("channels"):
            reply["channels"] = cookies["channels"].split("|")
        if cookies.get("ttl"):
            reply["expire_at"] = time.time() + float(cookies["ttl"])
        if kind == "nouser":
            reply = {"result": "allow"}
        elif kind == "longrefusal":
            reply = {"result": "refuse", "message": "é" * 150}
        elif kind == "refuselist":  # a code that is not a string: forbidden, not a crash
            reply = {"result": "refuse", "code": ["unauthorized"], "message": REFUSAL}
        elif kind == "refuseinternal":  # a refusal all the same, not a failure
            reply = {"result": "refuse", "code": "internal", "message": REFUSAL}
        return await self._answer("connect", request, reply, body, kind)

    async def _answer(
        self,
        hook: str,
        request: Request,
        ok: dict[str, Any],
        body: dict[str, Any] | None = None,
        kind: str | None = None,
    ) -> Response:
        if body is None:
            body = orjson.loads(await request.body())
        self.calls.append(HookCall(hook, body))
        if kind is None:
            kind = behaviour(str(body.get("channel", body.get("method", ""))))
        reply: dict[str, Any] = ok
        if kind == "refuse":
            reply = {"result": "refuse", "message": REFUSAL}
        elif kind == "refusecode":
            reply = {"result": "refuse", "code": "not_found", "message": REFUSAL}
        elif kind == "refusebogus":
            reply = {"result": "refuse", "code": "teapot", "message": REFUSAL}
        elif kind == "rewrite" and hook == "publish":
            reply = {"result": "accept", "data": {"rewritten": body["data"]}}
        elif kind == "info" and hook == "subscribe":
            reply = {"result": "allow", "info": INFO}
        elif kind == "huge" and hook == "publish":
            reply = {"result": "accept", "data": "x" * HUGE}
        elif hook == "rpc" and kind not in (
            "hang",
            "http500",
            "badjson",
            "unknown",
            "deep",
            "edge",
            "toobig",
        ):
            reply = {"result": "ok", "data": {"echo": body["data"], "user": body["user"]}}
        elif kind == "toobig":  # over the gateway's 1 MiB, streamed (no content-length)
            filler = b"x" * 65536
            head = b'{"result": "%s", "data": "' % ok["result"].encode()
            chunks = [head, *[filler] * 17, b'"}']
            return StreamingResponse(iter(chunks), media_type="application/json")
        elif kind in ("deep", "edge"):  # JSON orjson reads (1,024 levels), cannot write
            depth = 300 if kind == "deep" else 253
            deep = {**ok, "data": nested(depth), "info": nested(depth)}
            return Response(json.dumps(deep), media_type="application/json")
        elif kind == "unknown":
            reply = {"result": "maybe"}
        elif kind == "http500":
            return Response("backend broke", status_code=500)
        elif kind == "badjson":
            return Response(b"{not json", media_type="application/json")
        elif kind == "hang":
            self.pending += 1
            try:
                await self.release.wait()
            finally:
                self.pending -= 1
        return Response(orjson.dumps(reply), media_type="application/json")


@contextlib.asynccontextmanager
async def serve_fake_backend() -> AsyncIterator[FakeBackend]:
    """Run a ``FakeBackend`` with uvicorn on a free port in the current event loop."""
    backend = FakeBackend()
    async with serve_app(backend.app, "fake backend") as url:
        backend.url = url
        try:
            yield backend
        finally:
            backend.release.set()  # a hung call answers: the server can stop
