"""``GET /sse``: Server-Sent Events, a one-way transport over the same hub.

Everything that can fail (token, channel names, permissions, cursor, broker)
fails before the response starts, as an HTTP error with a JSON body. Then the
stream opens with ``retry:`` and the ``id:`` of the starting position of every
channel, so that a client that has not received any publication yet still
resumes losslessly.

Each event's ``id:`` is the cursor of all channels of the stream after that
event (``gateway.cursor``). On a one-channel stream that depends on the
publication alone, so the event and its HTTP chunk are built once for every such
stream (``gateway.wire``).

One lifecycle, whatever the server (``gateway.server.ports``): once the opening is
out, the ``Stream`` takes the response's port and the endpoint waits in
``port.hold()``, at once under the gateway's own protocol (an idle stream then runs
no task) or for the stream's life elsewhere. The stream ends when its writer does:
the session closed (drain, slow consumer, token expiry, the client gone).

A stream ended by the drain is given a last ``retry:`` first, at random between
``GATEWAY_SSE_RETRY_MS`` and three times it (``drained_retry``): a pod's streams all end
in the same instant, and EventSource reconnects after exactly its reconnection time,
so every browser of a drained pod would otherwise arrive at the other pods at once.

The FastAPI route and its response class are ``gateway.sse_route``'s (this module is
compiled: setup.py).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from typing import Final

from auth import Claims
from channels.broker import BrokerUnavailable
from channels.hub import SubscribeError, SubscribeResult
from channels.publication import Batch, Publication, StreamPosition
from channels.session import Ending, Gap, Outgoing
from gateway import cursor, wire
from gateway.access import checked_channel, require
from gateway.errors import CloseCode, ErrorCode, GatewayError
from gateway.runtime import Gateway
from gateway.server.ports import StreamPort
from gateway.timers import Timer, loop_timers

logger = logging.getLogger(__name__)

_PUBLICATION: Final = Publication  # (a constant: not read from the module's dict per item)

RAW_HEADERS = [
    (b"content-type", b"text/event-stream"),  # as the contract names it: UTF-8 always
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
FINISH_TIMEOUT = 1.0  # for the last chunk; a client that does not read is cut off


class SSETransport:
    """Writes queued items as SSE events, each one HTTP chunk, and keeps the cursor.

    Before the response has started (no ``port`` yet) nothing is written: items queue,
    and the opening's ``id:`` is the position the stream starts from.
    """

    def __init__(self, channels: list[str]) -> None:
        # Where the stream is on each channel: the last publication it was sent, or the
        # position it started from.
        self.positions: dict[str, cursor.Position] = {}
        self.single = len(channels) == 1
        self.port: StreamPort | None = None

    def cursor(self) -> str:
        return cursor.encode(self.positions)

    def write_now(self, item: Outgoing) -> bool:
        port = self.port
        if port is None:
            return False
        if self.single and type(item) is _PUBLICATION:  # the hot path, as ``_chunk``'s
            self.positions[item.channel] = item  # a publication is its own position
            cache = item.wire
            chunk = cache.chunk if cache is not None else None
            return port.try_write(chunk if chunk is not None else wire.single_chunk(item))
        return port.try_write(self._chunk(item))

    async def write(self, batch: list[Outgoing]) -> None:
        port = self.port
        assert port is not None, "the writer starts once the response has"
        if len(batch) == 1:
            chunk = self._chunk(batch[0])
        else:
            chunk = wire.frame_chunk(b"".join([self._event(item) for item in batch]))
        await port.write(chunk)

    def _chunk(self, item: Outgoing) -> bytes:
        """``item``'s event as one HTTP chunk; framed once per publication when single."""
        if self.single:
            if type(item) is _PUBLICATION:  # the hot path: the same chunk for every stream
                self.positions[item.channel] = item
                return wire.single_chunk(item)
            if type(item) is Batch:
                for message in item.messages:
                    if type(message) is _PUBLICATION:
                        self.positions[message.channel] = message
                return wire.single_chunk(item)
        return wire.frame_chunk(self._event(item))

    def events(self, items: list[Outgoing]) -> bytes:
        """``items`` as SSE events, unframed (the cursor kept)."""
        return b"".join([self._event(item) for item in items])

    def _event(self, item: Outgoing) -> bytes:
        if isinstance(item, Publication):
            self.positions[item.channel] = item
            if self.single:
                return wire.single_sse(item)
            return wire.sse_publication(self.cursor(), item)
        if isinstance(item, Batch):
            if self.single:  # the same events for every stream: the last one's position
                for message in reversed(item.messages):
                    if type(message) is _PUBLICATION:
                        self.positions[message.channel] = message
                        break
                return wire.single_events(item)
            return b"".join([self._event(message) for message in item.messages])
        if isinstance(item, Gap):
            if item.position is not None:  # the channel goes on from there
                self.positions[item.channel] = item.position
            return wire.sse_gap(self.cursor(), item.channel)
        if isinstance(item, str):
            return item.encode()
        if isinstance(item, bytes):  # a command's reply: a WebSocket's, never a stream's
            raise TypeError("an SSE stream takes no command replies")
        return wire.sse_presence(item)


class Stream:
    """One SSE client: its session, its transport and one timer, for its next heartbeat
    or, when sooner, the end of the stream at the token's expiry (a stream cannot
    refresh its token)."""

    def __init__(
        self, gateway: Gateway, claims: Claims, channels: list[str], client_id: str | None = None
    ) -> None:
        self.gateway = gateway
        self.transport = SSETransport(channels)
        self.session = gateway.new_session(self.transport, claims, "sse", client_id)
        self.deadline = gateway.verifier.deadline(claims)
        self._timer: Timer | None = None
        self._writer: asyncio.Task[None] | None = None

    def opening(self) -> bytes:
        """The response's first piece: the opening event (``retry:``, and the position
        the stream starts from as ``id:``), then the events its subscribes queued
        meanwhile (a resume's publications). Written at once with the response's head,
        a resume needs no writer task and no second write."""
        retry = self.gateway.settings.sse_retry_ms
        opening = wire.sse_opening(retry, self.transport.cursor())
        queued = self.session.take_queued()
        return opening + self.transport.events(queued) if queued else opening

    def start(self, port: StreamPort) -> None:
        """The response has started: write to ``port`` from now on."""
        self.transport.port = port
        self._arm()
        port.on_lost(self._lost)
        self.session.writer_on_demand(self._start_writer)

    def _arm(self) -> None:
        """The stream's timer: its next heartbeat, or its token's expiry when that comes
        first. On the loop's ``Timers`` (idle streams are the common case: no uvloop
        timer each)."""
        beat = self.gateway.settings.sse_heartbeat
        deadline = self.deadline
        if deadline is not None and (left := deadline - time.time()) < beat:
            self._timer = loop_timers().call_later(left, self._expire)
        else:
            self._timer = loop_timers().call_later(beat, self._heartbeat)

    def _heartbeat(self) -> None:
        if self.session.push(wire.HEARTBEAT):
            self._arm()

    def _expire(self) -> None:
        self.session.close(CloseCode.TOKEN_EXPIRED)

    def _lost(self) -> None:
        """The client left. With no writer running, the stream ends here and now when the
        hub can forget the session at once: no task, no last chunk (nobody would read it).
        Otherwise the writer ends it (``_write``)."""
        session = self.session
        if self._writer is None:
            session.writer_on_demand(None)
            session.close(Ending.CLIENT_GONE)
            if self.gateway.closed_now(session):
                if self._timer is not None:
                    self._timer.cancel()
                port = self.transport.port
                if port is not None:  # over ASGI: its call ends (it waits for this)
                    port.release()
                return
            session.writer_on_demand(self._start_writer)  # closed: it starts at once
        session.close(Ending.CLIENT_GONE)

    def _start_writer(self) -> None:
        name = f"sse:{self.session.client_id}"
        self._writer = asyncio.get_running_loop().create_task(self._write(), name=name)

    async def _write(self) -> None:
        session, port = self.session, self.transport.port
        assert port is not None
        try:
            await session.run_writer()  # however it ends, the stream ends
        finally:
            if self._timer is not None:
                self._timer.cancel()
            port.on_lost(None)
            session.close(Ending.CLIENT_GONE)
            await self.gateway.closed(session)  # without a wait when it can
        try:
            # A deadline on this task, not wait_for: no second task for every stream's end.
            async with asyncio.timeout(FINISH_TIMEOUT):
                if session.close_reason is CloseCode.SERVICE_RESTART:  # the drain's
                    retry = drained_retry(self.gateway.settings.sse_retry_ms)
                    await port.write(wire.frame_chunk(wire.sse_retry(retry)))
                await port.finish()
        except Exception:  # a client that does not read (slow consumer) or already gone
            port.abort()

    async def abandon(self) -> None:
        """The response never started (the client left): forget the session."""
        self.session.close(Ending.CLIENT_GONE)
        await self.gateway.closed(self.session)


def drained_retry(retry_ms: int) -> int:
    """The reconnect delay for a stream the drain ends: the usual one, plus up to twice
    it at random (see the module docstring)."""
    return retry_ms + random.randint(0, 2 * retry_ms)


def positions_from(raw: str | None) -> dict[str, StreamPosition]:
    """The cursor a reconnecting client sent (``Last-Event-ID`` or ``?last_event_id=``)."""
    if not raw:
        return {}
    try:
        return cursor.decode(raw.strip())
    except ValueError as exc:
        raise GatewayError(ErrorCode.BAD_REQUEST, f"bad Last-Event-ID: {exc}") from None


def checked_request(
    gateway: Gateway,
    claims: Claims,
    requested: list[str],
    last_event_id: str | None,
    granted: tuple[str, ...] = (),
) -> tuple[list[str], dict[str, StreamPosition]]:
    """The channels and resume positions of a ``GET /sse``, or the ``GatewayError`` it
    gets, in the endpoint's order of checks (the endpoint's and ``gateway.sse_opener``'s).
    ``granted``: the connect hook's channels, which need no permission."""
    if len(requested) == 1 and not granted:  # (most streams: no duplicates to drop)
        channels = [requested[0]]
    else:
        channels = list(dict.fromkeys([*requested, *granted]))
    if not channels:
        raise GatewayError(ErrorCode.BAD_REQUEST, "at least one ?channel= is required")
    for channel in channels:
        checked_channel(channel)
    for channel in channels:
        if channel not in granted:
            require(claims.can_subscribe(channel), "subscribing to", channel)
    if len(channels) > gateway.settings.max_channels_per_connection:
        raise GatewayError(ErrorCode.LIMIT_EXCEEDED, "too many channels on one stream")
    positions = positions_from(last_event_id)
    if gateway.draining or gateway.connections.at_capacity:
        raise GatewayError.unavailable("gateway is draining or full, retry elsewhere")
    return channels, positions


async def open_stream(
    gateway: Gateway,
    claims: Claims,
    channels: list[str],
    positions: dict[str, StreamPosition],
    client_id: str | None = None,
    granted: tuple[str, ...] = (),
) -> Stream:
    """A ``Stream`` subscribed to ``channels`` (from ``positions``), ready to start; or
    the ``GatewayError`` to answer, with nothing left behind. ``client_id`` and
    ``granted`` (its channels, decided already) come from the connect hook."""
    stream = Stream(gateway, claims, channels, client_id)
    gateway.opened(stream.session)
    try:
        for channel in channels:  # the backend's say first: nothing subscribed if it refuses
            if channel not in granted:
                await gateway.hooks.check_subscribe(claims, stream.session.client_id, channel)
        await subscribe_channels(stream, channels, positions)
    except BaseException as exc:
        await stream.abandon()
        raise gateway_error_of(exc) from None
    return stream


async def subscribe_channels(
    stream: Stream, channels: list[str], positions: dict[str, StreamPosition]
) -> None:
    hub = stream.gateway.hub
    for channel in channels:
        since = positions.get(channel)
        await hub.subscribe(stream.session, channel, since, on_ready_for(stream, channel, since))


def on_ready_for(
    stream: Stream, channel: str, since: StreamPosition | None
) -> Callable[[SubscribeResult], None]:
    """Where the stream starts on ``channel``: the client's position when recovered, else
    the channel's, announced as a gap when the client's could not be recovered."""
    transport, session = stream.transport, stream.session

    def on_ready(result: SubscribeResult) -> None:
        resumed = since is not None and result.recovered
        transport.positions[channel] = since if resumed and since else result.position
        if since is not None and not result.recovered:
            session.push(Gap(channel))

    return on_ready


def gateway_error_of(exc: BaseException) -> BaseException:
    """What a failed subscribe raises to the endpoint: its ``GatewayError``."""
    if isinstance(exc, BrokerUnavailable):
        return GatewayError.unavailable()
    if isinstance(exc, SubscribeError):
        return GatewayError(ErrorCode(exc.code), str(exc))
    return exc
