"""The chat demo's application backend (dev mode): a login that sets a session cookie, and
the backend hooks the gateway calls for the chat page (docs/protocol.md, "Backend hooks").

``python -m gateway`` in dev mode points ``GATEWAY_HOOKS`` at these routes
(``hooks_config``) unless the user set it, so the gateway calls itself over HTTP as it
would call an application:

- ``POST /demo/login`` (``{"name": …}``, JSON or a form) sets ``demo_session``, HttpOnly
  and SameSite=Lax: the user's name and expiry, signed with a key derived from the dev
  secret. ``POST /demo/logout`` clears it; ``GET /demo/session`` says who is logged in and
  whether the page may connect with the cookie alone (``"connect": "cookie"``) or needs a
  dev token (``"token"``: ``GATEWAY_HOOKS`` is the user's own).
- ``/demo/hooks/connect``, called only for connections without a token
  (``"with_token": false``): a valid cookie is allowed as its user, publishing and
  subscribing in the demo's rooms; no cookie, or a forged or expired one, is refused
  with ``unauthorized`` (WebSocket 4001, SSE 401, as without hooks).
- ``/demo/hooks/publish`` on ``chat:demo-*`` only: the clients of every other channel
  never wait on it and their data is published as they sent it. A message must be
  ``{"text": …}``; one with a banned word is refused with a message the page shows; any
  other is kept and published as ``{"id", "user", "text", "ts"}`` (the id and time
  assigned here).
- ``/demo/hooks/rpc``, method ``chat.history``: a room's kept messages before an id, a
  page at a time.

Messages live in this process's memory, the last ``KEEP`` of each of the ``MAX_ROOMS``
rooms written to most recently: a demo, not a store. A message is kept when the hook
accepts it, before the gateway publishes it, so one that the gateway then fails to
publish (the broker down) is in the history without ever having been pushed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import re
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import orjson
from fastapi import APIRouter, FastAPI
from starlette.requests import Request

from channels.names import is_valid_channel
from gateway.errors import ErrorCode, GatewayError, JSONBody
from gateway.runtime import Gateway

COOKIE = "demo_session"
SESSION_SECONDS = 86_400
ROOM_PREFIX = "chat:demo-"  # under GATEWAY_PRESENCE_CHANNELS' default chat:*: presence works
ROOMS = [ROOM_PREFIX + "*"]
HISTORY_METHOD = "chat.history"
HOOK_PATHS = {
    "connect": "/demo/hooks/connect",
    "publish": "/demo/hooks/publish",
    "rpc": "/demo/hooks/rpc",
}
BANNED = re.compile(r"\b(darn|heck|frak)\b", re.IGNORECASE)
MAX_NAME = 40
MAX_TEXT = 1000
KEEP = 500
MAX_ROOMS = 1000
PAGE = 20
MAX_PAGE = 50


def hooks_config(base: str) -> str:
    """``GATEWAY_HOOKS`` for this backend served at ``base`` (``http://host:port``)."""
    config = {
        "connect": {"url": base + HOOK_PATHS["connect"], "with_token": False, "headers": ["host"]},
        "publish": {"url": base + HOOK_PATHS["publish"], "channels": ROOMS},
        "rpc": {"url": base + HOOK_PATHS["rpc"], "methods": [HISTORY_METHOD]},
    }
    return orjson.dumps(config).decode()


def install(app: FastAPI, gateway: Gateway) -> None:
    """Dev mode only: the login and the hooks, signed with a key made from the dev secret."""
    assert gateway.dev_secret is not None, "the demo backend exists in dev mode only"
    hook = gateway.hooks.hooks.get("connect")
    wired = hook is not None and urlsplit(hook.url).path == HOOK_PATHS["connect"]
    app.include_router(ChatBackend(gateway.dev_secret, cookie_login=wired).router)


# --------------------------------------------------------------------------- sessions


@dataclass(frozen=True, slots=True)
class Login:
    user: str
    expires: int  # Unix seconds


class Sessions:
    """Session cookies ``<payload>.<mac>``: the payload base64url JSON of the user and the
    expiry, the mac an HMAC-SHA256 of it. Nothing is kept on the server."""

    def __init__(self, secret: str) -> None:
        self._key = hmac.new(secret.encode(), b"demo session cookie", hashlib.sha256).digest()

    def _mac(self, payload: str) -> str:
        return hmac.new(self._key, payload.encode(), hashlib.sha256).hexdigest()

    def issue(self, user: str, now: float | None = None) -> tuple[str, Login]:
        """The cookie's value for ``user``, valid ``SESSION_SECONDS`` from ``now``."""
        login = Login(user, int(now if now is not None else time.time()) + SESSION_SECONDS)
        raw = orjson.dumps({"user": login.user, "exp": login.expires})
        payload = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
        return f"{payload}.{self._mac(payload)}", login

    def check(self, cookie: object) -> Login | None:
        """The login of a cookie this backend signed and that has not expired, else None."""
        if not isinstance(cookie, str):
            return None
        payload, _, mac = cookie.rpartition(".")
        if not payload or not hmac.compare_digest(mac, self._mac(payload)):
            return None
        try:
            fields = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        except ValueError:  # bad base64, or not JSON (orjson.JSONDecodeError is one)
            return None
        user, expires = fields.get("user"), fields.get("exp")
        if not isinstance(user, str) or not isinstance(expires, int) or expires <= time.time():
            return None
        return Login(user, expires)


def display_name(value: object) -> str:
    """A name as people see it: spaces collapsed, 1 to ``MAX_NAME`` printable characters."""
    name = " ".join(value.split()) if isinstance(value, str) else ""
    if not name or len(name) > MAX_NAME or not name.isprintable():
        raise GatewayError(ErrorCode.BAD_REQUEST, f"a name is 1 to {MAX_NAME} printable characters")
    return name


# --------------------------------------------------------------------------- messages


class Rooms:
    """The last ``keep`` messages of each room, for the ``max_rooms`` rooms written to most
    recently. Ids come from one counter: they grow across rooms, and a room that was
    forgotten and written to again never reuses one."""

    def __init__(self, keep: int = KEEP, max_rooms: int = MAX_ROOMS) -> None:
        self._keep = keep
        self._max_rooms = max_rooms
        self._rooms: OrderedDict[str, deque[dict[str, Any]]] = OrderedDict()
        self._ids = itertools.count(1)

    def add(self, room: str, user: str, text: str) -> dict[str, Any]:
        message = {"id": next(self._ids), "user": user, "text": text, "ts": round(time.time(), 3)}
        kept = self._rooms.get(room)
        if kept is None:
            kept = self._rooms[room] = deque(maxlen=self._keep)
            if len(self._rooms) > self._max_rooms:
                self._rooms.popitem(last=False)
        else:
            self._rooms.move_to_end(room)
        kept.append(message)
        return message

    def page(self, room: str, before: int | None, limit: int) -> tuple[list[dict[str, Any]], bool]:
        """Up to ``limit`` messages older than id ``before`` (None: the newest), oldest
        first, and whether there are older ones still."""
        older = [m for m in self._rooms.get(room, ()) if before is None or m["id"] < before]
        return older[-limit:], len(older) > limit


# --------------------------------------------------------------------------- routes


def refuse(code: ErrorCode, message: str) -> JSONBody:
    return JSONBody({"result": "refuse", "code": str(code), "message": message})


async def json_object(request: Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        body = None
    if not isinstance(body, dict):
        raise GatewayError(ErrorCode.BAD_REQUEST, "the body must be a JSON object")
    return body


def room_of(channel: object) -> str | None:
    """The demo room of a channel (``chat:demo-lobby``: ``lobby``), else None."""
    if not is_valid_channel(channel):
        return None
    assert isinstance(channel, str)
    room = channel.removeprefix(ROOM_PREFIX)
    return room if room and room != channel else None


def positive_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(value)
    return value


class ChatBackend:
    """The routes above, on one session key and one store of messages."""

    def __init__(self, secret: str, *, cookie_login: bool) -> None:
        self.sessions = Sessions(secret)
        self.rooms = Rooms()
        # How the chat page connects: with the cookie when the gateway's connect hook is
        # this backend's, else with a dev token (the user configured other hooks).
        self.connect_with = "cookie" if cookie_login else "token"
        self.router = router = APIRouter(include_in_schema=False)
        router.add_api_route("/demo/login", self.login, methods=["POST"])
        router.add_api_route("/demo/logout", self.logout, methods=["POST"])
        router.add_api_route("/demo/session", self.session, methods=["GET"])
        router.add_api_route(HOOK_PATHS["connect"], self.connect_hook, methods=["POST"])
        router.add_api_route(HOOK_PATHS["publish"], self.publish_hook, methods=["POST"])
        router.add_api_route(HOOK_PATHS["rpc"], self.rpc_hook, methods=["POST"])

    def _state(self, user: str | None) -> dict[str, Any]:
        return {"user": user, "connect": self.connect_with}

    async def login(self, request: Request) -> JSONBody:
        if request.headers.get("content-type", "").startswith("application/json"):
            fields = await json_object(request)
        else:
            fields = dict(parse_qsl((await request.body()).decode(errors="replace")))
        cookie, login = self.sessions.issue(display_name(fields.get("name")))
        response = JSONBody(self._state(login.user))
        # Secure where the page came over https (directly, or behind a proxy saying so).
        secure = "https" in (request.url.scheme, request.headers.get("x-forwarded-proto"))
        response.set_cookie(
            COOKIE,
            cookie,
            max_age=SESSION_SECONDS,
            path="/",
            httponly=True,
            samesite="lax",
            secure=secure,
        )
        return response

    async def logout(self) -> JSONBody:
        response = JSONBody(self._state(None))
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="lax")
        return response

    async def session(self, request: Request) -> JSONBody:
        login = self.sessions.check(request.cookies.get(COOKIE))
        return JSONBody(self._state(login.user if login else None))

    async def connect_hook(self, request: Request) -> JSONBody:
        body = await json_object(request)
        if body.get("claims") is not None:
            return JSONBody({"result": "allow"})  # a token speaks for itself
        # A browser sends the cookie with a handshake from any page (another port of the
        # same host too): only the chat's own pages may use it.
        origin, headers = body.get("origin"), body.get("headers")
        host = headers.get("host") if isinstance(headers, dict) else None
        if isinstance(origin, str) and urlsplit(origin).netloc != host:
            return refuse(ErrorCode.FORBIDDEN, "the chat's session is for its own pages")
        cookies = body.get("cookies")
        login = self.sessions.check(cookies.get(COOKIE) if isinstance(cookies, dict) else None)
        if login is None:
            return refuse(ErrorCode.UNAUTHORIZED, "no session: log in on the chat page first")
        return JSONBody(
            {
                "result": "allow",
                "user": login.user,
                "info": {"name": login.user},
                "subscribe": ROOMS,
                "publish": ROOMS,
                "expire_at": login.expires,
            }
        )

    async def publish_hook(self, request: Request) -> JSONBody:
        body = await json_object(request)
        room = room_of(body.get("channel"))
        if room is None:
            return JSONBody({"result": "accept"})  # not a demo room: as sent
        data = body.get("data")
        text = data.get("text") if isinstance(data, dict) else None
        text = text.strip() if isinstance(text, str) else ""
        if not text or len(text) > MAX_TEXT:
            return refuse(
                ErrorCode.BAD_REQUEST, f'a message is {{"text": …}} of 1 to {MAX_TEXT} characters'
            )
        banned = BANNED.search(text)
        if banned is not None:
            word = banned.group(0).lower()
            return refuse(ErrorCode.FORBIDDEN, f'please keep it civil: "{word}" is not allowed')
        message = self.rooms.add(room, str(body.get("user")), text)
        return JSONBody({"result": "accept", "data": message})

    async def rpc_hook(self, request: Request) -> JSONBody:
        """``chat.history`` ``{"room", "before"?, "limit"?}``: ``{"messages", "more"}``,
        the messages oldest first."""
        body = await json_object(request)
        method = body.get("method")
        if method != HISTORY_METHOD:
            return refuse(ErrorCode.NOT_FOUND, f"no rpc method {str(method)[:128]}")
        data = body.get("data")
        if not isinstance(data, dict):
            data = {}
        room = data.get("room")
        if not isinstance(room, str) or room_of(ROOM_PREFIX + room) is None:
            return refuse(ErrorCode.BAD_REQUEST, '"data" must name a "room"')
        try:
            before = None if data.get("before") is None else positive_int(data["before"])
            limit = min(positive_int(data.get("limit", PAGE)), MAX_PAGE)
        except ValueError:
            return refuse(ErrorCode.BAD_REQUEST, '"before" and "limit" are positive integers')
        messages, more = self.rooms.page(room, before, limit)
        return JSONBody({"result": "ok", "data": {"messages": messages, "more": more}})
