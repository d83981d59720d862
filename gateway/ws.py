"""``GET /ws``: the WebSocket transport, a thin adapter between a port and the hub.

One lifecycle, whatever the server (``gateway.server.ports``): once the handshake is
accepted the endpoint starts a ``Connection`` on the connection's port and waits in
``port.hold()``, which under the gateway's own protocol returns at once (the
connection outlives its ASGI call, and an idle one runs no task at all) and under
any other server keeps the call until the connection is over.

A ``Connection`` is its ``Session`` (in the hub), a reader task that exists only
while received commands wait (``gateway.dispatch`` handles them; a port may hand each
message over as it is read, ``_take_direct``), and a writer task
(``Session.run_writer``) that exists only once needed: something had to queue
behind a full socket, or the session closes, in which case the writer owns the
close frame. Pushes are written straight to the socket from the fan-out loop
(``WebSocketTransport.write_now``).

Anything that ends a session (slow consumer, token expiry, drain, too many bad
frames, a frame too big) calls ``Session.close`` with the reason; the writer
flushes what is queued (a slow consumer's queue is dropped) and sends the close
frame; the reader then sees the disconnect and cleans up.

The ASGI route (stock protocols, other servers) is ``gateway.ws_route``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Final

from starlette.requests import cookie_parser
from starlette.types import Message

from auth import AuthError, Claims
from channels.broker import BrokerUnavailable
from channels.hub import SubscribeError
from channels.publication import Batch, PresenceEvent, Publication
from channels.session import Ending, Gap, Outgoing, Unrecoverable
from gateway import dispatch, wire
from gateway.admission import ask_backend, refusal
from gateway.commands import BadFrame, Command, parse_command
from gateway.errors import Close, CloseCode, ErrorCode, close_for, refusal_name
from gateway.hooks import Grant
from gateway.query import hooked, query_value, token_of
from gateway.ratelimit import RateLimiter
from gateway.runtime import Gateway
from gateway.server.ports import (
    Accept,
    Deferred,
    Opener,
    Refuse,
    RequestHead,
    WebSocketPort,
)
from gateway.timers import Timer, loop_timers

logger = logging.getLogger(__name__)

# What ``write_now`` asks of every item, as constants (not read from the module's dict)
_PUBLICATION: Final = Publication
_SHARED: Final = (Batch, PresenceEvent)  # built once for all subscribers, like a publication
_GAP: Final = Gap


class WebSocketTransport:
    """Writes pushes and replies as text frames. A ``Gap`` is not told (the contract has
    no push for it: a new epoch on the pushes is how a client sees one), but one whose
    channel goes on in the same epoch (``lost``) ends the connection, nothing after it
    written (``insufficient state``): the client's resubscribe answers ``recovered:
    false``, where otherwise it would have seen an offset jump and nothing else."""

    def __init__(self, port: WebSocketPort) -> None:
        self.port = port

    def write_now(self, item: Outgoing) -> bool:
        # The hot path: what the fan-out writes to every subscriber (a publication, those
        # of one pass, a join or a leave), its frames built once, for all.
        if type(item) is _PUBLICATION or isinstance(item, _SHARED):
            cache = item.wire
            frames = cache.ws if cache is not None else None
            return self.port.try_write(frames if frames is not None else wire.ws_frames(item))
        if isinstance(item, _GAP):
            if item.lost:
                raise Unrecoverable(CloseCode.INSUFFICIENT_STATE)
            return True
        return self.port.try_write(wire.ws_frames(item))

    async def write(self, batch: list[Outgoing]) -> None:
        frames = []
        lost = False
        for item in batch:
            if isinstance(item, Gap):
                if item.lost:  # what follows it is not written
                    lost = True
                    break
            else:
                frames.append(wire.ws_frames(item))
        if frames:
            await self.port.write(frames[0] if len(frames) == 1 else b"".join(frames))
        if lost:
            raise Unrecoverable(CloseCode.INSUFFICIENT_STATE)


class Connection:
    """The command side of one WebSocket client: reads, dispatches, ends."""

    def __init__(
        self,
        gateway: Gateway,
        claims: Claims,
        port: WebSocketPort,
        grant: Grant | None = None,
        client_id: str | None = None,
    ) -> None:
        """``grant``: the connect hook's, which ``claims`` include already; ``client_id``:
        the id the hook was told."""
        self.gateway = gateway
        self.claims = claims
        self.port = port
        self.grant = grant
        transport = WebSocketTransport(port)
        self.session = gateway.new_session(transport, claims, "websocket", client_id)
        self.bad_frames = 0
        self.publish_limiter: RateLimiter | None = None  # (``dispatch._allowed``)
        self._expiry: Timer | None = None
        self._writer: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._finished = False

    def start(self) -> None:
        gateway = self.gateway
        # Checked before the handshake too; again here for those let in meanwhile (a
        # connect hook's wait, or stock uvicorn's accept): at most the limit get in.
        refused = CloseCode.TRY_AGAIN_LATER if gateway.connections.at_capacity else None
        if gateway.draining:
            refused = CloseCode.SERVICE_RESTART
        gateway.opened(self.session)
        self._hold(self.claims)
        self.session.writer_on_demand(self._start_writer)  # idle connections need no task
        if refused is not None:
            gateway.connections.refuse("websocket", refusal_name(refused))
            self.port.listen(self._wake_reader, self._take_direct)
            self.session.close(refused)
            return
        if self.grant is not None and self.grant.channels:
            # The connect hook's channels, before any command: the reader waits for them.
            name = f"ws-reader:{self.session.client_id}"
            self._reader = asyncio.get_running_loop().create_task(
                self._subscribe_granted(), name=name
            )
        self.port.listen(self._wake_reader, self._take_direct)

    async def _subscribe_granted(self) -> None:
        assert self.grant is not None
        try:
            for channel in self.grant.channels:
                await self.gateway.hub.subscribe(self.session, channel)
        except BrokerUnavailable:
            self.session.close(CloseCode.TRY_AGAIN_LATER)
        except SubscribeError:  # closed meanwhile
            pass
        except Exception:
            logger.exception("subscribing the connect hook's channels failed")
            self.session.close(CloseCode.INTERNAL_ERROR)
        finally:
            self._reader = None
        self._wake_reader()  # what the client sent meanwhile

    def _wake_reader(self) -> None:
        """Handle what the client sent, here, while each message needs no wait; a task
        from the first one that does (it then reads the rest, in order)."""
        port = self.port
        while self._reader is None and not self._finished and port.pending():
            if not self._handle(port.take()):
                return

    def _take_direct(self, message: Message) -> bool:
        """``listen``'s ``take``: a message handled as it is read, none waiting before
        it; False (it waits) while a reader task runs, or once finished."""
        if self._reader is not None or self._finished:
            return False
        self._handle(message)
        return True

    def _handle(self, message: Message) -> bool:
        """Handle ``message`` now, or start the reader task with it; False if it failed."""
        try:
            if self._take_now(message):
                return True
        except Exception:
            logger.exception("websocket reader failed")
            self.session.close(CloseCode.INTERNAL_ERROR)
            return False
        name = f"ws-reader:{self.session.client_id}"
        self._reader = asyncio.get_running_loop().create_task(
            self._read_pending(message), name=name
        )
        return True

    def _take_now(self, message: Message) -> bool:
        """Handle ``message`` without a wait; False, with nothing done, if it needs one."""
        if message["type"] == "websocket.disconnect":
            return self._finish_now()
        if self.session.close_reason is not None:
            return True  # closing: ignore what the client still sends
        command = self._command(message)
        return command is None or dispatch.handle_now(self, command)

    async def _read_pending(self, message: Message) -> None:
        port = self.port
        try:
            while True:
                if message["type"] == "websocket.disconnect":
                    await self._finish()
                else:
                    await self._take(message)
                if self._finished or not port.pending():
                    break
                message = port.take()
        except Exception:
            logger.exception("websocket reader failed")
            self.session.close(CloseCode.INTERNAL_ERROR)
        finally:
            self._reader = None

    def _finish_now(self) -> bool:
        """``_finish`` when nothing in it has to wait: the hub forgets the session at once
        and no writer is mid-write. False when ``_finish`` must be awaited (it repeats
        what was done here: closing the session is idempotent)."""
        if self._finished:
            return True
        writer = self._writer
        if writer is not None and not writer.done():
            return False
        session = self.session
        session.writer_on_demand(None)
        session.close(Ending.CLIENT_GONE)
        if not self.gateway.closed_now(session):
            return False
        self._finished = True
        if self._expiry is not None:
            self._expiry.cancel()
        self.port.release()
        return True

    async def _finish(self) -> None:
        """The client is gone (or the close handshake is done): forget the session."""
        if self._finished:
            return
        self._finished = True
        session = self.session
        if self._expiry is not None:
            self._expiry.cancel()
        session.writer_on_demand(None)
        session.close(Ending.CLIENT_GONE)
        await self.gateway.closed(session)
        writer = self._writer
        if writer is not None:
            if not writer.done():
                writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
        self.port.release()

    def _start_writer(self) -> None:
        name = f"ws-writer:{self.session.client_id}"
        self._writer = asyncio.get_running_loop().create_task(self._write(), name=name)

    async def _write(self) -> None:
        session = self.session
        if not await session.run_writer():
            return  # the client went away mid-write
        # Closing: stop taking deliveries now, even if the close frame waits behind a
        # client that does not read (the slow consumer's state is freed at once).
        await self.gateway.closed(session)
        close = close_for(session.close_reason)
        if close is not None:
            with contextlib.suppress(OSError):  # the client left meanwhile
                await self.port.close(close.code, close.reason)

    def refresh(self, claims: Claims) -> None:
        """Hold a refreshed token's ``claims`` (with what the connect hook granted on top)."""
        self._hold(claims if self.grant is None else self.grant.apply(claims))

    def _hold(self, claims: Claims) -> None:
        """Hold ``claims`` from now on, and close when they expire."""
        self.claims = claims
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        deadline = self.gateway.verifier.deadline(claims)
        if deadline is not None:
            self._expiry = loop_timers().call_later(deadline - time.time(), self._expire)

    def _expire(self) -> None:
        self.session.close(CloseCode.TOKEN_EXPIRED)

    async def _take(self, message: Message) -> None:
        """Handle one received message."""
        if self.session.close_reason is not None:
            return  # closing: ignore what the client still sends
        command = self._command(message)
        if command is not None:
            await dispatch.handle(self, command)

    def _command(self, message: Message) -> Command | None:
        """The frame's command; None when it was answered (or closed) already."""
        text = message.get("text")
        frame: str | bytes = text if text is not None else message.get("bytes") or b""
        if self._too_big(frame):
            self.session.close(CloseCode.MESSAGE_TOO_BIG)
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
        limit = self.gateway.settings.max_message_bytes
        if len(frame) > limit:
            return True
        return isinstance(frame, str) and len(frame) * 4 > limit and len(frame.encode()) > limit

    def _bad_frame(self, exc: BadFrame) -> None:
        if exc.malformed:
            self.bad_frames += 1
            if self.bad_frames >= self.gateway.settings.max_bad_frames:
                self.session.close(CloseCode.BAD_REQUEST)
                return
        self.session.push(wire.error_reply(exc.id, ErrorCode.BAD_REQUEST, exc.message))


def opener(gateway: Gateway) -> Opener:
    """``/ws`` answered below ASGI by the gateway's own protocol (``OPEN_WEBSOCKET``): the same
    checks, in the same order, as the endpoint and its token dependency, with no framework
    call, dependency solving or task on the way; the connection starts on the protocol."""

    def open_websocket(upgrade: RequestHead) -> Accept | Refuse | Deferred | None:
        if upgrade.path != "/ws":
            return None
        token = token_of(
            query_value(upgrade.query_string, "token"), upgrade.header("authorization")
        )
        try:
            claims: Claims | AuthError = gateway.verifier.verify(token)
        except AuthError as exc:
            claims = exc
        by_hook = hooked(gateway, claims)
        refused = refusal(gateway, upgrade.header("origin"), claims, by_hook)
        if refused is not None:
            return Refuse(refused.code, refused.reason)
        if by_hook:
            return Deferred(lambda: _ask_backend(gateway, claims, upgrade))
        assert not isinstance(claims, AuthError)
        return lambda port: Connection(gateway, claims, port).start()

    return open_websocket


class _UpgradeHeaders:
    """An upgrade's headers as the connect hook reads them (``Opening.headers``)."""

    def __init__(self, upgrade: RequestHead) -> None:
        self._upgrade = upgrade

    def get(self, name: str) -> str | None:
        return self._upgrade.header(name)


async def _ask_backend(
    gateway: Gateway, claims: Claims | AuthError, upgrade: RequestHead
) -> Accept | Refuse:
    """The opener's answer once the connect hook's is in (``Deferred``)."""
    cookies = cookie_parser(upgrade.header("cookie") or "")
    answer = await ask_backend(gateway, claims, cookies, _UpgradeHeaders(upgrade))
    if isinstance(answer, Close):
        return Refuse(answer.code, answer.reason)
    return lambda port: Connection(
        gateway, answer.claims, port, answer.grant, answer.client_id
    ).start()
