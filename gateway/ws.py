"""``GET /ws``: the WebSocket transport, a thin adapter between frames and the hub.

Under the gateway's uvicorn protocol a connection, once accepted, is detached
from its ASGI call (``Connection.detach``): the endpoint returns and the
connection is its protocol, its ``Connection`` and its hub ``Session``, with no
task while idle. A reader task runs while received commands are handled, a
writer task (``Session.run_writer``) only once needed: something had to queue
behind a full socket, or the session closes with a code, in which case it owns
the close frame. Pushes are written straight to the socket from the fan-out
loop (``WebSocketTransport``). Under any other ASGI server (or with
``GATEWAY_RAW_WRITES=false``) the endpoint's task reads (``Connection.run``)
and writes go through ASGI ``send``.

Anything that ends a session (slow consumer, token expiry, drain, too many bad
frames, a frame too big) calls ``Session.close``; the writer flushes what is
queued (except for a slow consumer, whose queue is dropped) and sends the close
frame; the reader then sees the disconnect and cleans up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import orjson
from fastapi import APIRouter, WebSocket
from starlette.types import Message, Receive, Send
from starlette.websockets import WebSocketDisconnect

from auth import AuthError, Claims
from channels.broker import BrokerUnavailable
from channels.hub import SubscribeError, SubscribeResult
from channels.lite import LiteTimer, lite_timers
from channels.publication import Batch, PresenceEvent, Publication
from channels.session import NOT_NOW, Gap, Outgoing, Session, Started, start_write
from gateway.commands import BadFrame, Command, CommandId, parse_command
from gateway.deps import MaybeClaimsDep
from gateway.errors import Close, CloseCode, ErrorCode, GatewayError
from gateway.ratelimit import RateLimiter
from gateway.runtime import Gateway
from gateway.wsprotocol import RAW_FRAMES, text_frame

logger = logging.getLogger(__name__)
router = APIRouter()


class RawFrames(Protocol):
    """What ``GatewayWebSocketProtocol`` offers under ``scope["extensions"][RAW_FRAMES]``."""

    def write_frame(self, frame: bytes) -> bool: ...

    async def wait_writable(self) -> None: ...

    def detach(self, on_message: Callable[[], object]) -> None: ...

    def pending(self) -> bool: ...

    async def receive(self) -> Message: ...

    async def close_with(self, code: int, reason: str) -> None: ...


def frame_of(item: Publication | PresenceEvent | Batch | str) -> bytes:
    """``item``'s text frame(s); a push's are built once and shared by all its subscribers."""
    if isinstance(item, str):
        return text_frame(item.encode())
    frame = item.ws
    if frame is None:
        if isinstance(item, Batch):
            frame = item.ws = b"".join([frame_of(message) for message in item.messages])
        else:
            frame = item.ws = text_frame(item.json)
    return frame


class WebSocketTransport:
    """Writes queued items as text frames; ``Gap`` markers are SSE-only and skipped.

    Under the gateway's own uvicorn protocol the frames go straight to the socket
    (``RawFrames``); under any other ASGI server through ``send``.
    """

    __slots__ = ("_raw", "_send")

    def __init__(self, *, raw: RawFrames | None = None, send: Send | None = None) -> None:
        assert (raw is None) != (send is None), "one of raw and send"
        self._raw = raw
        self._send = send

    async def write(self, batch: list[Outgoing]) -> None:
        raw = self._raw
        if raw is not None:
            for item in batch:
                if isinstance(item, Gap):
                    continue
                frame = frame_of(item)
                while not raw.write_frame(frame):
                    await raw.wait_writable()
            return
        send = self._send
        assert send is not None
        for item in batch:
            if isinstance(item, str):
                await send({"type": "websocket.send", "text": item})
            elif isinstance(item, Batch):
                for message in item.messages:
                    await send({"type": "websocket.send", "text": message.frame})
            elif not isinstance(item, Gap):
                await send({"type": "websocket.send", "text": item.frame})

    def write_now(self, item: Outgoing) -> Started:
        if isinstance(item, Gap):
            return None
        raw = self._raw
        if raw is not None:
            return None if raw.write_frame(frame_of(item)) else NOT_NOW
        if isinstance(item, Batch):
            return NOT_NOW  # several sends: the writer task does them
        text = item if isinstance(item, str) else item.frame
        assert self._send is not None
        try:
            return start_write(self._send({"type": "websocket.send", "text": text}))
        except (WebSocketDisconnect, RuntimeError) as exc:
            raise ConnectionError("client disconnected") from exc


def encode_reply(id: CommandId, result: Any) -> str:
    reply: dict[str, Any] = {} if id is None else {"id": id}
    reply["ok"] = True
    reply["result"] = result
    return orjson.dumps(reply).decode()


def encode_error(id: CommandId, code: ErrorCode, message: str) -> str:
    reply: dict[str, Any] = {} if id is None else {"id": id}
    reply["ok"] = False
    reply["error"] = {"code": str(code), "message": message}
    return orjson.dumps(reply).decode()


class Connection:
    """The command side of one WebSocket client.

    Two ways to run: ``run(receive)`` reads in the endpoint's own task (any ASGI
    server), or ``detach(raw)`` under the gateway's uvicorn protocol: the endpoint
    returns, and a task exists only while received commands are being handled
    (``_read_pending``), as the writer exists only while something waits to be
    written. An idle detached connection runs no task at all.
    """

    __slots__ = (
        "_close_socket",
        "_expiry",
        "_finished",
        "_raw",
        "_reader",
        "_writer",
        "bad_frames",
        "claims",
        "gateway",
        "hub",
        "max_message_bytes",
        "publish_limiter",
        "session",
    )

    def __init__(
        self,
        gateway: Gateway,
        claims: Claims,
        transport: WebSocketTransport,
        close_socket: Callable[[int, str], Awaitable[None]],
    ) -> None:
        self.gateway = gateway
        self.hub = gateway.hub
        self.claims = claims
        settings = gateway.settings
        self.session = Session(
            transport,
            user=claims.user,
            info=claims.info,
            max_queue_bytes=settings.client_queue_bytes,
            transport_name="websocket",
            observe_latency=gateway.metrics.latency.observe,
        )
        self.bad_frames = 0
        self.max_message_bytes = settings.max_message_bytes
        self.publish_limiter = RateLimiter(settings.client_publish_rate)
        self._close_socket = close_socket
        self._expiry: LiteTimer | None = None
        self._writer: asyncio.Task[None] | None = None
        self._raw: RawFrames | None = None
        self._reader: asyncio.Task[None] | None = None
        self._finished = False

    # -- lifecycle -------------------------------------------------------------

    async def run(self, receive: Receive) -> None:
        """Read and handle commands until the client disconnects."""
        self._open()
        try:
            while await self._take(await receive()):
                pass
        finally:
            await self._finish()

    def detach(self, raw: RawFrames) -> None:
        """Take messages from ``raw`` as they come; the caller's task may end now."""
        self._open()
        self._raw = raw
        raw.detach(self._wake_reader)

    def _wake_reader(self) -> None:
        if self._reader is None and not self._finished:
            name = f"ws-reader:{self.session.client_id}"
            self._reader = asyncio.create_task(self._read_pending(), name=name)

    async def _read_pending(self) -> None:
        raw = self._raw
        assert raw is not None
        try:
            while raw.pending() and not self._finished:
                if not await self._take(await raw.receive()):
                    await self._finish()
        except Exception:
            logger.exception("websocket reader failed")
            self.session.close(1011, "internal error")
        finally:
            self._reader = None

    def _open(self) -> None:
        session = self.session
        self.gateway.opened(session)
        self._arm_expiry()
        session.writer_on_demand(self._start_writer)  # idle connections need no task

    async def _finish(self) -> None:
        """The client is gone (or the close handshake is done): forget the session."""
        if self._finished:
            return
        self._finished = True
        session = self.session
        if self._expiry is not None:
            self._expiry.cancel()
        session.writer_on_demand(None)
        session.close(*CloseCode.NORMAL)
        await self.gateway.closed(session)
        writer = self._writer
        if writer is not None:
            if not writer.done():
                writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer

    def _start_writer(self) -> None:
        name = f"ws-writer:{self.session.client_id}"
        self._writer = asyncio.create_task(self._write(), name=name)

    async def _write(self) -> None:
        session = self.session
        try:
            if not await session.write_until_closed():
                return  # the client went away mid-write
        except (WebSocketDisconnect, RuntimeError):
            return  # the same, seen through ASGI send
        # Closing: stop taking deliveries now, even if the close frame waits behind a
        # client that does not read (the slow consumer's state is freed at once).
        await self.gateway.closed(session)
        code, reason = session.close_reason or CloseCode.NORMAL
        if code != CloseCode.NORMAL.code:
            with contextlib.suppress(Exception):
                await self._close_socket(code, reason)

    def _arm_expiry(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        deadline = self.gateway.verifier.deadline(self.claims)
        if deadline is not None:
            self._expiry = lite_timers().call_later(
                deadline - time.time(), self.session.close, *CloseCode.TOKEN_EXPIRED
            )

    # -- reading ---------------------------------------------------------------

    async def _take(self, message: Message) -> bool:
        """Handle one received message; False once the client has disconnected."""
        if message["type"] == "websocket.disconnect":
            return False
        if self.session.close_reason is not None:
            return True  # closing: ignore what the client still sends
        command = self._command(message)
        if command is not None:
            await self._handle(command)
        return True

    def _command(self, message: Message) -> Command | None:
        """The frame's command; None when it was answered (or closed) already."""
        text = message.get("text")
        frame: str | bytes = text if text is not None else message.get("bytes") or b""
        if self._too_big(frame):
            self.session.close(*CloseCode.MESSAGE_TOO_BIG)
            return None
        if text is None:
            self._bad_frame(BadFrame("binary frames are not accepted; send JSON text frames"))
            return None
        try:
            return parse_command(text)
        except BadFrame as exc:
            self._bad_frame(exc)
            return None

    def _too_big(self, frame: str | bytes) -> bool:
        limit = self.max_message_bytes
        if len(frame) > limit:
            return True
        return isinstance(frame, str) and len(frame) * 4 > limit and len(frame.encode()) > limit

    def _bad_frame(self, exc: BadFrame) -> None:
        if exc.malformed:
            self.bad_frames += 1
            if self.bad_frames >= self.gateway.settings.max_bad_frames:
                self.session.close(*CloseCode.BAD_REQUEST)
                return
        self.session.push(encode_error(exc.id, ErrorCode.BAD_REQUEST, exc.message))

    async def _handle(self, command: Command) -> None:
        try:
            handler = getattr(self, f"op_{command.op}")
            result = await handler(command)
        except GatewayError as exc:
            self.session.push(encode_error(command.id, exc.code, exc.message))
        except SubscribeError as exc:
            self.session.push(encode_error(command.id, ErrorCode(exc.code), str(exc)))
        except BrokerUnavailable:
            self.session.push(
                encode_error(command.id, ErrorCode.INTERNAL, "broker unavailable, retry later")
            )
        except Exception:
            logger.exception("op %s failed", command.op)
            self.session.push(encode_error(command.id, ErrorCode.INTERNAL, "internal error"))
        else:
            if result is not None:
                self.session.push(encode_reply(command.id, result))

    # -- ops (each returns the reply's result, or None when it queued the reply itself) --

    def _require(self, allowed: bool, action: str, channel: str) -> None:
        if not allowed:
            raise GatewayError(ErrorCode.FORBIDDEN, f"token does not allow {action} {channel}")

    async def op_subscribe(self, command: Command) -> None:
        channel = command.channel
        self._require(self.claims.can_subscribe(channel), "subscribing to", channel)
        session = self.session

        def reply(result: SubscribeResult) -> None:
            position = result.position
            session.push(
                encode_reply(
                    command.id,
                    {
                        "offset": position.offset,
                        "epoch": position.epoch,
                        "recovered": result.recovered,
                    },
                )
            )

        await self.hub.subscribe(session, channel, command.since, on_ready=reply)

    async def op_unsubscribe(self, command: Command) -> dict[str, Any]:
        await self.hub.unsubscribe(self.session, command.channel)
        return {}

    async def op_publish(self, command: Command) -> dict[str, Any]:
        channel = command.channel
        self._require(self.claims.can_publish(channel), "publishing to", channel)
        if not self.publish_limiter.allow():
            raise GatewayError(ErrorCode.RATE_LIMITED, "publishing too fast")
        publication: Publication = await self.hub.publish(channel, command.data)
        return {"offset": publication.offset, "epoch": publication.epoch}

    async def op_presence(self, command: Command) -> dict[str, Any]:
        channel = command.channel
        self._require(self.claims.can_subscribe(channel), "presence of", channel)
        entries = await self.hub.presence(channel)
        return {"clients": [orjson.Fragment(entry) for entry in entries]}

    async def op_history(self, command: Command) -> dict[str, Any]:
        channel = command.channel
        self._require(self.claims.can_subscribe(channel), "history of", channel)
        page = await self.hub.history(channel, since=command.since, limit=command.limit)
        if not page.complete:
            raise GatewayError(ErrorCode.NOT_FOUND, "history no longer covers that position")
        return {
            "publications": [pub.history_entry() for pub in page.publications],
            "offset": page.position.offset,
            "epoch": page.position.epoch,
        }

    async def op_ping(self, command: Command) -> dict[str, Any]:
        return {}

    async def op_refresh(self, command: Command) -> dict[str, Any]:
        try:
            claims = self.gateway.verifier.verify(command.token)
        except AuthError as exc:
            raise GatewayError(ErrorCode.UNAUTHORIZED, str(exc)) from None
        if claims.user != self.claims.user:
            raise GatewayError(ErrorCode.FORBIDDEN, "a refreshed token must be for the same user")
        self.claims = claims
        self._arm_expiry()
        return {}


async def _refuse(websocket: WebSocket, close: Close) -> None:
    """Accept, then close with ``close``: browsers can only read the code after a handshake."""
    await websocket.accept()
    await websocket.close(close.code, close.reason)


@router.websocket("/ws")
async def websocket_endpoint(websocket: WebSocket, claims: MaybeClaimsDep) -> None:
    gateway: Gateway = websocket.app.state.gateway
    if not gateway.origin_allowed(websocket.headers.get("origin")):
        return await _refuse(websocket, CloseCode.ORIGIN_NOT_ALLOWED)
    if gateway.draining:
        return await _refuse(websocket, CloseCode.SERVICE_RESTART)
    if gateway.at_capacity:
        return await _refuse(websocket, CloseCode.TRY_AGAIN_LATER)
    if isinstance(claims, AuthError):
        close = CloseCode.TOKEN_EXPIRED if claims.expired else CloseCode.UNAUTHORIZED
        return await _refuse(websocket, close)
    await websocket.accept()
    raw: RawFrames | None = None
    if gateway.settings.raw_writes:
        raw = (websocket.scope.get("extensions") or {}).get(RAW_FRAMES)
    if raw is not None:
        # The connection lives on in the protocol; this call (and the framework's
        # frames around it) ends here.
        transport = WebSocketTransport(raw=raw)
        Connection(gateway, claims, transport, raw.close_with).detach(raw)
        return None
    transport = WebSocketTransport(send=websocket.send)
    await Connection(gateway, claims, transport, websocket.close).run(websocket.receive)
    return None
