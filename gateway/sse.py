"""``GET /sse``: Server-Sent Events, a one-way transport over the same hub.

Everything that can fail (token, channel names, permissions, cursor, broker)
fails before the response starts, as an HTTP error with a JSON body. Then the
stream opens with ``retry:`` and the ``id:`` of the starting position of every
channel, so that a client that has not received any publication yet still
resumes losslessly.

Each event's ``id:`` is the cursor of all channels of the stream after that
event (``gateway.cursor``). A stream with one channel caches the whole event
on the publication, so it is encoded once for all such streams; under the
gateway's own HTTP protocol it is also framed once as an HTTP chunk and written
straight to the socket (``gateway.httpprotocol``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from channels.broker import BrokerUnavailable
from channels.hub import SubscribeError, SubscribeResult
from channels.lite import LiteTimer, lite_timers
from channels.names import is_valid_channel
from channels.publication import Batch, Publication, StreamPosition
from channels.session import NOT_NOW, Gap, Outgoing, Session, Started, start_write
from gateway import cursor
from gateway.deps import ClaimsDep, GatewayDep
from gateway.errors import ErrorCode, GatewayError
from gateway.httpprotocol import RAW_BODY, RawBody, frame_chunk
from gateway.runtime import Gateway

logger = logging.getLogger(__name__)
router = APIRouter()

RAW_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
HEARTBEAT = ": ping\n\n"
TOKEN_EXPIRED = (1000, "token expired")


class SSETransport:
    """Formats queued items as SSE events and keeps the stream's cursor.

    Under ``GatewayHttpToolsProtocol`` each event is one HTTP chunk written straight to
    the socket (``raw``, see ``gateway.httpprotocol``); elsewhere it goes through ASGI
    ``send``. Both are set once the response has started.
    """

    __slots__ = ("positions", "raw", "send", "single")

    def __init__(self, channels: list[str]) -> None:
        self.positions: dict[str, StreamPosition] = {}
        self.single = len(channels) == 1
        self.send: Send | None = None
        self.raw: RawBody | None = None

    def cursor(self) -> str:
        return cursor.encode(self.positions)

    def event(self, item: Outgoing) -> bytes:
        if isinstance(item, Publication):
            self.positions[item.channel] = item.position
            if self.single:
                cached = item.sse
                if cached is None:
                    cached = item.sse = self._publication_event(item)
                return cached
            return self._publication_event(item)
        if isinstance(item, Gap):
            data = orjson.dumps({"channel": item.channel})
            return b"event: gap\nid: %s\ndata: %s\n\n" % (self.cursor().encode(), data)
        if isinstance(item, str):
            return item.encode()
        if isinstance(item, Batch):
            return b"".join([self.event(message) for message in item.messages])
        return b"event: %s\ndata: %s\n\n" % (item.event.encode(), item.json)

    def _publication_event(self, item: Publication) -> bytes:
        return b"id: %s\ndata: %s\n\n" % (self.cursor().encode(), item.json)

    def chunk(self, item: Outgoing) -> bytes:
        """``item``'s event as one HTTP chunk; framed once per publication when single."""
        if self.single and isinstance(item, Publication):
            self.positions[item.channel] = item.position
            cached = item.sse_chunk
            if cached is None:
                event = item.sse or self._publication_event(item)
                cached = item.sse_chunk = frame_chunk(event)
            return cached
        if self.single and isinstance(item, Batch):
            cached = item.sse_chunk
            if cached is None:
                cached = item.sse_chunk = frame_chunk(self.event(item))
            else:
                for message in item.messages:
                    if isinstance(message, Publication):
                        self.positions[message.channel] = message.position
            return cached
        return frame_chunk(self.event(item))

    async def write(self, batch: list[Outgoing]) -> None:
        raw = self.raw
        if raw is not None:
            if len(batch) == 1:
                chunk = self.chunk(batch[0])
            else:
                chunk = frame_chunk(b"".join([self.event(item) for item in batch]))
            # raw is only set once the chunked response started, so False means paused.
            while not raw.write(chunk):
                await raw.drain()
            return
        assert self.send is not None
        body = b"".join([self.event(item) for item in batch])
        await self.send({"type": "http.response.body", "body": body, "more_body": True})

    def write_now(self, item: Outgoing) -> Started:
        raw = self.raw
        if raw is not None:
            return None if raw.write(self.chunk(item)) else NOT_NOW
        if self.send is None:  # the response has not started: queue until the writer runs
            return NOT_NOW
        body = self.event(item)
        return start_write(
            self.send({"type": "http.response.body", "body": body, "more_body": True})
        )


class EventStream(Response):
    """The streaming response: the opening, then the session's writer and a heartbeat.

    Under the gateway's HTTP protocol (raw writes) the stream detaches from its ASGI
    call once the opening is out (``DetachedStream``): no task while idle, and the
    protocol reports a lost connection (``RawBody.on_lost``). Elsewhere a writer
    task and a task watching ``receive`` for the disconnect run side by side.
    """

    def __init__(
        self,
        gateway: Gateway,
        session: Session,
        transport: SSETransport,
        deadline: float | None,
    ) -> None:
        super().__init__(status_code=200)
        self.raw_headers = list(RAW_HEADERS)  # no content-length: the body is a stream
        self.gateway = gateway
        self.session = session
        self.transport = transport
        self.deadline = deadline

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        session, settings = self.session, self.gateway.settings
        timers: StreamTimers | None = None
        detached = False
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            opening = f"retry: {settings.sse_retry_ms}\nid: {self.transport.cursor()}\n\n"
            await send({"type": "http.response.body", "body": opening.encode(), "more_body": True})
            # From here on pushes may be written directly; what queued meanwhile goes first.
            raw: RawBody | None = scope.get("extensions", {}).get(RAW_BODY)
            if raw is not None and raw.chunked and settings.raw_writes:
                self.transport.raw = raw
                # The ASGI call ends here.
                DetachedStream(self.gateway, session, raw).start(self.deadline)
                detached = True
                return
            self.transport.send = send
            timers = StreamTimers(session, settings.sse_heartbeat, self.deadline)
            await self._write_in_task(receive)
        finally:
            if not detached:
                if timers is not None:
                    timers.cancel()
                session.close(1000, "")
                await self.gateway.closed(session)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(
                        send({"type": "http.response.body", "body": b"", "more_body": False}), 1.0
                    )

    async def _write_in_task(self, receive: Receive) -> None:
        session = self.session
        watch = asyncio.create_task(_wait_disconnect(receive), name="sse-disconnect")
        writer = asyncio.create_task(session.run_writer(), name=f"sse:{session.client_id}")
        session.abort = writer.cancel
        try:
            await asyncio.wait({writer, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            session.close(1000, "")
            watch.cancel()
            if not writer.done():
                if not watch.done() or watch.cancelled():
                    # Ending normally (drain, slow consumer): give queued events a moment.
                    with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                        await asyncio.wait_for(asyncio.shield(writer), 1.0)
                writer.cancel()
            with contextlib.suppress(BaseException):
                await writer


class StreamTimers:
    """A stream's clock: a ``: ping`` comment every ``interval`` seconds until cancelled
    or the session closes, and the end of the stream at ``deadline`` (wall clock: the
    token's ``exp`` plus leeway; a stream cannot refresh its token)."""

    __slots__ = ("_beat_handle", "_expiry", "interval", "session")

    def __init__(self, session: Session, interval: float, deadline: float | None) -> None:
        self.session = session
        self.interval = interval
        timers = lite_timers()  # idle streams are the common case: no uvloop timer each
        self._beat_handle = timers.call_later(interval, self._beat)
        self._expiry: LiteTimer | None = None
        if deadline is not None:
            self._expiry = timers.call_later(deadline - time.time(), session.close, *TOKEN_EXPIRED)

    def _beat(self) -> None:
        if self.session.push(HEARTBEAT):
            self._beat_handle = self._beat_handle.owner.call_later(self.interval, self._beat)

    def cancel(self) -> None:
        self._beat_handle.cancel()
        if self._expiry is not None:
            self._expiry.cancel()


class DetachedStream:
    """A raw SSE stream after its ASGI call returned.

    What is left of it: the session (in the hub), its timers (heartbeat, token
    expiry), and the protocol's ``on_lost`` hook. The session's writer task starts only when needed
    (a push has to wait for a full socket, or the stream ends), and the stream ends
    when that writer does: the session closed (drain, slow consumer, lost client).
    """

    __slots__ = ("_timers", "_writer", "gateway", "raw", "session")

    def __init__(self, gateway: Gateway, session: Session, raw: RawBody) -> None:
        self.gateway = gateway
        self.session = session
        self.raw = raw
        self._timers: StreamTimers | None = None
        self._writer: asyncio.Task[None] | None = None

    def start(self, deadline: float | None) -> None:
        self.raw.on_lost = self._lost
        self.raw.detach()
        interval = self.gateway.settings.sse_heartbeat
        self._timers = StreamTimers(self.session, interval, deadline)
        self.session.writer_on_demand(self._start_writer)

    def _lost(self) -> None:
        self.session.close(1000, "")

    def _start_writer(self) -> None:
        name = f"sse:{self.session.client_id}"
        self._writer = asyncio.create_task(self._write(), name=name)

    async def _write(self) -> None:
        session = self.session
        try:
            await session.write_until_closed()  # however it ends, the stream ends
        finally:
            if self._timers is not None:
                self._timers.cancel()
            self.raw.on_lost = None
            session.close(1000, "")
            await self.gateway.closed(session)
        try:
            await asyncio.wait_for(self.raw.finish(), 1.0)
        except Exception:  # a client that does not read (slow consumer) or already gone
            self.raw.abort()


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _positions_from(request: Request) -> dict[str, StreamPosition]:
    raw = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
    if not raw:
        return {}
    try:
        return cursor.decode(raw.strip())
    except ValueError as exc:
        raise GatewayError(ErrorCode.BAD_REQUEST, f"bad Last-Event-ID: {exc}") from None


@router.get("/sse", response_class=Response)
async def sse_endpoint(request: Request, gateway: GatewayDep, claims: ClaimsDep) -> Any:
    channels = list(dict.fromkeys(request.query_params.getlist("channel")))
    if not channels:
        raise GatewayError(ErrorCode.BAD_REQUEST, "at least one ?channel= is required")
    for channel in channels:
        if not is_valid_channel(channel):
            raise GatewayError(ErrorCode.BAD_REQUEST, f"invalid channel name {channel[:140]!r}")
    for channel in channels:
        if not claims.can_subscribe(channel):
            raise GatewayError(
                ErrorCode.FORBIDDEN, f"token does not allow subscribing to {channel}"
            )
    if len(channels) > gateway.settings.max_channels_per_connection:
        raise GatewayError(ErrorCode.LIMIT_EXCEEDED, "too many channels on one stream")
    positions = _positions_from(request)
    if gateway.draining or gateway.at_capacity:
        raise GatewayError(ErrorCode.UNAVAILABLE, "gateway is draining or full, retry elsewhere")

    transport = SSETransport(channels)
    session = Session(
        transport,
        user=claims.user,
        info=claims.info,
        max_queue_bytes=gateway.settings.client_queue_bytes,
        transport_name="sse",
        observe_latency=gateway.metrics.latency.observe,
    )
    gateway.opened(session)
    try:
        for channel in channels:
            since = positions.get(channel)

            def on_ready(
                result: SubscribeResult,
                channel: str = channel,
                since: StreamPosition | None = since,
            ) -> None:
                resumed = since is not None and result.recovered
                transport.positions[channel] = since if resumed and since else result.position
                if since is not None and not result.recovered:
                    session.push(Gap(channel))

            await gateway.hub.subscribe(session, channel, since, on_ready=on_ready)
    except BrokerUnavailable:
        await gateway.closed(session)
        raise GatewayError(ErrorCode.UNAVAILABLE, "broker unavailable") from None
    except SubscribeError as exc:
        await gateway.closed(session)
        raise GatewayError(ErrorCode(exc.code), str(exc)) from None
    except BaseException:
        await gateway.closed(session)
        raise
    return EventStream(gateway, session, transport, gateway.verifier.deadline(claims))
