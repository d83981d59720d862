"""The WebSocket client: one connection carrying every channel, kept open for you.

It mirrors the JavaScript client (docs/client.md): commands are matched to replies by
``id``; a dropped connection is reopened with exponential backoff and jitter (the next URL
of ``url`` when several are given), every subscription is resubscribed with ``since``
its last delivered position, and the client counts as connected only once every one
of those subscribes was answered (a ``ping`` sent after them is the barrier: the gateway
runs a connection's commands in order). A handshake the gateway refuses (accepted, then
closed with 1012/1013/4001) is therefore never a connection and does not reset the
backoff. With a ``token_factory`` the token is replaced before it expires (the ``refresh``
op on the open connection) and after a 4001 close.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
from collections.abc import Callable, Sequence
from typing import Any, Literal

import orjson
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from gatewayclient.commands import Commands
from gatewayclient.errors import CLOSED, DISCONNECTED, TIMEOUT, GatewayError
from gatewayclient.items import notify
from gatewayclient.models import Position, StateChange, SubscriptionEvent
from gatewayclient.subscription import Subscription
from gatewayclient.tokens import TokenFactory, TokenSource, backoff, refresh_delay
from gatewayclient.wire import (
    INSUFFICIENT_STATE,
    QUICK_RECONNECT,
    SERVICE_RESTART,
    SLOW_CONSUMER,
    TRY_AGAIN_LATER,
    UNAUTHORIZED,
    error_of,
    websocket_url,
)

logger = logging.getLogger(__name__)

RESUBSCRIBE_RETRY = 2.0  # seconds (half to one and a half of it) before a resubscribe again


class Client(Commands):
    """An asyncio client of the gateway's WebSocket. Use ``connect()``."""

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        token: str | None = None,
        token_factory: TokenFactory | None = None,
        min_reconnect_delay: float = 0.5,
        max_reconnect_delay: float = 20.0,
        busy_reconnect_delay: float = 5.0,
        refresh_before_expiry: float = 30.0,
        command_timeout: float = 10.0,
        websocket_options: dict[str, Any] | None = None,
        on_state: Callable[[StateChange], object] | None = None,
    ) -> None:
        self.urls = [url] if isinstance(url, str) else list(url)
        if not self.urls:
            raise ValueError("no gateway URL")
        self.tokens = TokenSource(token, token_factory)
        self.min_reconnect_delay = min_reconnect_delay
        self.max_reconnect_delay = max_reconnect_delay
        self.busy_reconnect_delay = busy_reconnect_delay
        self.refresh_before_expiry = refresh_before_expiry
        self.command_timeout = command_timeout
        # close_timeout: a connection dead unseen (a black hole) holds a close 2 s, not 10.
        options = {"max_size": 2**24, "close_timeout": 2.0, **(websocket_options or {})}
        self.websocket_options = options
        self.on_state = on_state
        self.subscriptions: dict[str, Subscription] = {}
        self.url: str | None = None  # the gateway URL of the current connection
        self.connections = 0  # connections established so far (1 + reconnects)
        self.last_close: tuple[int | None, str] | None = None  # code, reason of the last drop
        self._ws: ClientConnection | None = None
        self._connected = asyncio.Event()
        self._stopped = asyncio.Event()
        self._fatal: GatewayError | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._subscribing: dict[int, Subscription] = {}
        self._sent_on: dict[str, ClientConnection] = {}
        self._retries: set[asyncio.Task[None]] = set()  # resubscribes tried again later
        self._runner: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def start(self) -> None:
        """Start connecting (and reconnecting until ``close()``); return once connected.

        Raises ``GatewayError`` when the gateway refused the token and there is no factory
        (``unauthorized``), or ``timeout`` after ``command_timeout`` seconds."""
        if self._runner is None:
            self._runner = asyncio.create_task(self._run(), name="gatewayclient")
        await self.wait_connected(self.command_timeout)

    async def wait_connected(self, timeout: float | None = None) -> None:
        stopped = asyncio.ensure_future(self._stopped.wait())
        connected = asyncio.ensure_future(self._connected.wait())
        try:
            await asyncio.wait({stopped, connected}, timeout=timeout, return_when="FIRST_COMPLETED")
        finally:
            stopped.cancel()
            connected.cancel()
        if self._connected.is_set():
            return
        if self._stopped.is_set():
            raise self._fatal or GatewayError(CLOSED, "the client is closed")
        last = "" if self.last_close is None else " (last attempt: {} {})".format(*self.last_close)
        raise GatewayError(TIMEOUT, f"not connected within {timeout}s{last}")

    async def close(self) -> None:
        """Close the connection and stop; every subscription's iteration ends. Idempotent."""
        self._stop(None, reason="closed by the client")
        if self._runner is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner

    def _stop(self, error: GatewayError | None, code: int | None = None, reason: str = "") -> None:
        if self._stopped.is_set():
            return
        self._fatal = error
        self._stopped.set()
        self._state("closed", self.url, code, reason or (error.message if error else ""))
        if self._runner is not None and self._runner is not asyncio.current_task():
            self._runner.cancel()
        for task in self._retries:
            task.cancel()
        for sub in self.subscriptions.values():
            if error is not None:
                sub.fail(error)
            else:
                sub.end()

    async def __aenter__(self) -> Client:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _state(
        self,
        state: Literal["connecting", "connected", "disconnected", "closed"],
        url: str | None,
        code: int | None = None,
        reason: str = "",
    ) -> None:
        notify(self.on_state, StateChange(state, url, code, reason))

    # -- the reconnect loop ------------------------------------------------------

    async def _run(self) -> None:
        attempt = 0
        code: int | None = None
        reason = ""
        for turn in itertools.count():
            url = self.urls[turn % len(self.urls)]
            self._state("connecting", url, code, reason)
            code, reason = None, ""
            opened = False
            try:
                token = await self.tokens.current()
            except GatewayError as exc:
                self._stop(exc)  # rejected and nothing can renew it
                return
            except Exception:
                logger.exception("token_factory failed")
            else:
                try:
                    async with ws_connect(
                        websocket_url(url, token), **self.websocket_options
                    ) as ws:
                        opened = await self._session(ws, url)
                    code, reason = ws.close_code, ws.close_reason or ""
                except (OSError, InvalidHandshake, TimeoutError) as exc:
                    reason = repr(exc)
                except Exception as exc:  # a frame this client could not handle: start over
                    logger.exception("the connection to %s failed", url)
                    reason = repr(exc)
            self.last_close = (code, reason)
            if opened:
                attempt = 0
                self._state("disconnected", url, code, reason)
            if code == UNAUTHORIZED:
                self.tokens.rejected = True
                if self.tokens.factory is None:
                    error = GatewayError("unauthorized", reason or "unauthorized")
                    self._stop(error, code, error.message)
                    return
            if code in (SERVICE_RESTART, SLOW_CONSUMER, INSUFFICIENT_STATE) and opened:
                delay = random.uniform(0, QUICK_RECONNECT)
            else:
                delay = backoff(attempt, self.min_reconnect_delay, self.max_reconnect_delay)
                if code == TRY_AGAIN_LATER:
                    delay = max(delay, self.busy_reconnect_delay)
            attempt += 1
            logger.info("reconnecting in %.2fs (close %s %s)", delay, code, reason)
            await asyncio.sleep(delay)

    async def _session(self, ws: ClientConnection, url: str) -> bool:
        """Resubscribe, wait for the barrier, then read until the connection closes.
        Returns whether the connection was established (the barrier passed)."""
        self._ws = ws
        reader = asyncio.create_task(self._read(ws))
        refresher: asyncio.Task[None] | None = None
        try:
            for sub in list(self.subscriptions.values()):
                await self._send_subscribe(ws, sub)
            await self._call_on(ws, "ping", {})
            self.url = url
            self.connections += 1
            self._connected.set()
            self._state("connected", url)
            refresher = asyncio.create_task(self._refresh_loop())
            await reader
            return True
        except (GatewayError, ConnectionClosed):
            return self._connected.is_set()
        finally:
            self._connected.clear()
            self._ws = None
            for task in (reader, refresher):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            lost = GatewayError(DISCONNECTED, "the connection dropped before the reply")
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(lost)
            self._pending.clear()
            self._subscribing.clear()

    async def _read(self, ws: ClientConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for raw in ws:
                try:
                    frame = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    logger.warning("the gateway sent a frame that is not JSON")
                    continue
                if isinstance(frame, dict):
                    self._dispatch(frame)

    def _dispatch(self, frame: dict[str, Any]) -> None:
        if "ok" in frame:
            cmd_id = frame.get("id")
            sub = self._subscribing.pop(cmd_id, None) if isinstance(cmd_id, int) else None
            if sub is not None:
                # Handled here, before the pushes that follow the reply on the wire.
                self._on_subscribe_reply(sub, frame)
            future = self._pending.pop(cmd_id, None) if isinstance(cmd_id, int) else None
            if future is not None and not future.done():
                future.set_result(frame)
            return
        channel = frame.get("channel")
        sub = self.subscriptions.get(channel) if isinstance(channel, str) else None
        if sub is not None:
            sub.on_push(frame)

    def _on_subscribe_reply(self, sub: Subscription, reply: dict[str, Any]) -> None:
        if self.subscriptions.get(sub.channel) is not sub:
            return  # unsubscribed meanwhile
        if reply.get("ok"):
            sub.on_subscribed(reply.get("result") or {})
            if not sub.ready.done():
                sub.ready.set_result(None)
            return
        error = error_of(reply)
        if sub.ready.done() and error.code == "internal":
            # A resubscription the gateway cannot make just now (its broker is down, a
            # hook failed): again a little later on this connection, from the same
            # position (a new connection resubscribes anyway). A refusal is final.
            ws = self._sent_on.get(sub.channel)
            task = asyncio.get_running_loop().create_task(self._resubscribe_later(ws, sub))
            self._retries.add(task)
            task.add_done_callback(self._retries.discard)
            return
        del self.subscriptions[sub.channel]
        sub.fail(error)

    async def _resubscribe_later(self, ws: ClientConnection | None, sub: Subscription) -> None:
        await asyncio.sleep(random.uniform(0.5, 1.5) * RESUBSCRIBE_RETRY)
        if ws is not None and self._ws is ws and self.subscriptions.get(sub.channel) is sub:
            with contextlib.suppress(ConnectionClosed):
                await self._send_subscribe(ws, sub)

    async def _send_subscribe(self, ws: ClientConnection, sub: Subscription) -> None:
        self._sent_on[sub.channel] = ws
        cmd_id = next(self._ids)
        command: dict[str, Any] = {"id": cmd_id, "op": "subscribe", "channel": sub.channel}
        if (since := sub.since()) is not None:
            command["since"] = since
        self._subscribing[cmd_id] = sub
        await ws.send(orjson.dumps(command).decode())

    async def _refresh_loop(self) -> None:
        """Replace the token ``refresh_before_expiry`` seconds before its ``exp``."""
        while self.tokens.factory is not None and self.tokens.token is not None:
            delay = refresh_delay(self.tokens.token, self.refresh_before_expiry)
            if delay is None:
                return
            await asyncio.sleep(max(delay, 1.0))
            try:
                token = await self.tokens.renew()
                await self._call("refresh", token=token)
            except GatewayError as exc:
                logger.warning("token refresh failed: %s", exc)
            except Exception:
                logger.exception("token_factory failed")

    # -- commands ----------------------------------------------------------------

    async def _call_on(
        self, ws: ClientConnection, op: str, fields: dict[str, Any], timeout: float | None = None
    ) -> dict[str, Any]:
        cmd_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[cmd_id] = future
        try:
            await ws.send(orjson.dumps({"id": cmd_id, "op": op, **fields}).decode())
            reply = await asyncio.wait_for(future, timeout or self.command_timeout)
        except ConnectionClosed:
            raise GatewayError(DISCONNECTED, "the connection dropped") from None
        except TimeoutError:
            raise GatewayError(TIMEOUT, f"no reply to {op} within the timeout") from None
        finally:
            self._pending.pop(cmd_id, None)
        if not reply.get("ok"):
            raise error_of(reply)
        result = reply.get("result")
        return result if isinstance(result, dict) else {}

    async def _call(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send a command once connected (waiting up to ``command_timeout``)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.command_timeout
        await self.wait_connected(self.command_timeout)
        ws = self._ws
        if ws is None:
            raise GatewayError(DISCONNECTED, "the connection dropped")
        return await self._call_on(ws, op, fields, max(0.001, deadline - loop.time()))

    async def subscribe(
        self,
        channel: str,
        *,
        since: Position | None = None,
        on_event: Callable[[SubscriptionEvent], object] | None = None,
    ) -> Subscription:
        """Subscribe; return once the gateway confirmed it (``GatewayError`` if refused).

        ``since`` resumes from a position you stored; the subscription then starts with a
        ``Gap`` if the gateway could not recover from it. ``on_event`` is called with
        ``Subscribed`` on every subscribe reply (reconnects too) and with each ``Gap``."""
        if self._stopped.is_set():
            raise self._fatal or GatewayError(CLOSED, "the client is closed")
        if channel in self.subscriptions:
            raise GatewayError("bad_request", f"already subscribed to {channel}")
        sub = Subscription(channel, since, on_event)
        self.subscriptions[channel] = sub
        ws = self._ws
        if ws is not None and self._sent_on.get(channel) is not ws:
            # Connected, or resubscribing (whose loop did not see this one): send it here.
            with contextlib.suppress(ConnectionClosed):
                await self._send_subscribe(ws, sub)
        try:
            await asyncio.wait_for(asyncio.shield(sub.ready), self.command_timeout)
        except TimeoutError:
            self.subscriptions.pop(channel, None)
            sub.end()
            raise GatewayError(TIMEOUT, f"subscribe to {channel} not confirmed") from None
        return sub

    async def unsubscribe(self, channel: str) -> None:
        """Stop delivering ``channel``; its iteration ends."""
        sub = self.subscriptions.pop(channel, None)
        self._sent_on.pop(channel, None)
        if sub is None:
            return
        sub.end()
        ws = self._ws  # connected, or resubscribing (its subscribe may be sent already)
        if ws is not None:
            with contextlib.suppress(GatewayError):
                await self._call_on(ws, "unsubscribe", {"channel": channel})
