"""A read-only client over Server-Sent Events (``GET /sse``, httpx streaming).

One stream carries every channel. The client keeps the last ``id:`` (the cursor, opaque,
the position of every channel) and sends it back as ``Last-Event-ID`` when it reopens
the stream: after a dropped connection, a drained worker, or the end of the stream at
the token's expiry. SSE cannot refresh a token in place: with a ``token_factory`` the
client opens a second stream with a new token shortly before the first one's ``exp``
and switches to it. Reading the old stream pauses while the new one opens, so the new
one starts from the cursor of exactly what was delivered; once it answers 200 the old
one is closed unread, and anything the new one repeats would be dropped by the
deduplication by (channel, epoch, offset). If the switch fails the old stream is read
on, and ends at expiry: the client reconnects as after any end. ``event: gap`` becomes
a ``Gap`` item.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, Literal

import httpx
import orjson

from gatewayclient.errors import TIMEOUT, GatewayError
from gatewayclient.items import ItemQueue, notify
from gatewayclient.models import Gap, Item, Position, PresenceEvent, Publication, StateChange
from gatewayclient.tokens import TokenFactory, TokenSource, backoff, refresh_delay

logger = logging.getLogger(__name__)

PERMANENT = {400, 403, 404}  # a request that will not get better by retrying


class _Refused(Exception):
    """A refusal worth retrying (401 with a ``token_factory``, 503, …)."""

    def __init__(self, status: int, code: str) -> None:
        super().__init__(f"HTTP {status} {code}")
        self.status = status


def cursor_positions(cursor: str) -> dict[str, Position]:
    """The positions a cursor names, for ``Gap`` items only (the cursor is opaque: a
    format this does not understand gives no positions, never an error)."""
    found: dict[str, Position] = {}
    for entry in cursor.split(","):
        parts = entry.split("~")
        if len(parts) == 3 and parts[2].isdigit():
            found[parts[0]] = Position(parts[1], int(parts[2]))
    return found


_LINE_END = re.compile(r"\r\n|\r|\n")


async def sse_lines(text: AsyncIterator[str]) -> AsyncIterator[str]:
    """The stream's lines, ended as the SSE standard ends them: CRLF, LF or CR, and
    nothing else. (httpx's ``aiter_lines`` also ends one at U+2028, U+2029, U+0085 and
    the other breaks ``str.splitlines`` knows: a token holding one had its JSON cut in
    two, its event dropped, and the cursor moved past it.) A last line with no end is
    not one: no event is complete without the blank line after it."""
    rest = ""
    async for piece in text:
        rest += piece
        # A CR at the very end may be the first half of a CRLF: kept for the next piece.
        cut = len(rest) - 1 if rest.endswith("\r") else len(rest)
        lines = _LINE_END.split(rest[:cut])
        rest = lines.pop() + rest[cut:]
        for line in lines:
            yield line


async def sse_blocks(lines: AsyncIterator[str]) -> AsyncIterator[dict[str, str]]:
    """The fields of each event block (``id``, ``event``, ``data``, ``retry``)."""
    block: dict[str, str] = {}
    data: list[str] = []
    async for line in lines:
        if not line:
            if data:
                block["data"] = "\n".join(data)
            if block:
                yield block
            block, data = {}, []
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "data":
                data.append(value)
            elif name in ("id", "event", "retry"):
                block[name] = value


class SseClient:
    """``async with SseClient(url, ["news"], token=…) as sse: async for item in sse: …``

    Items are ``Publication``, ``Gap`` and ``PresenceEvent``. ``cursor`` is the last
    position seen: store it and pass it back (``cursor=``) to resume later. A refusal
    that retrying cannot fix (400, 403, 404; 401 without a ``token_factory``) ends the
    iteration with a ``GatewayError``.
    """

    def __init__(
        self,
        url: str,
        channels: Iterable[str],
        *,
        token: str | None = None,
        token_factory: TokenFactory | None = None,
        cursor: str | None = None,
        min_reconnect_delay: float = 0.5,
        max_reconnect_delay: float = 20.0,
        refresh_before_expiry: float = 30.0,
        on_state: Callable[[StateChange], object] | None = None,
        http: httpx.AsyncClient | None = None,
        stall_timeout: float = 45.0,
    ) -> None:
        self.base = url.rstrip("/")
        self.channels = list(dict.fromkeys(channels))
        self.tokens = TokenSource(token, token_factory)
        self.cursor = cursor
        self.min_reconnect_delay = min_reconnect_delay
        self.max_reconnect_delay = max_reconnect_delay
        self.refresh_before_expiry = refresh_before_expiry
        self.on_state = on_state
        self.connections = 0  # streams opened so far (token switches included)
        self.switches = 0  # streams replaced before their token expired
        self.repeats = 0  # publications dropped as already delivered (the gateway sends none)
        self.positions: dict[str, Position] = {}  # of the last publication delivered
        self._own = http is None
        # A stream silent for stall_timeout is dead (the gateway writes a ": ping" every
        # GATEWAY_SSE_HEARTBEAT, 15 s): a proxy that stopped forwarding, a paused pod, a
        # server that accepted and never answered. Reopened, from the cursor.
        self.http = http or httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=stall_timeout))
        self._items = ItemQueue("the stream was closed")
        self._opened = asyncio.Event()
        self._reading = asyncio.Event()  # cleared while a switch opens the next stream
        self._reading.set()
        self._runner: asyncio.Task[None] | None = None

    async def start(self, timeout: float = 10.0) -> None:
        """Open the stream; return once it is open (its first block read), or raise the
        refusal that ended it, or ``GatewayError("timeout")``."""
        if self._runner is None:
            self._runner = asyncio.create_task(self._run(), name="gatewayclient-sse")
        waiter = asyncio.ensure_future(self._opened.wait())
        try:
            await asyncio.wait(
                {waiter, self._runner}, timeout=timeout, return_when="FIRST_COMPLETED"
            )
        finally:
            waiter.cancel()
        if self._opened.is_set():
            return
        if self._runner.done():
            await self.__anext__()  # raises the error that ended it
        raise GatewayError(TIMEOUT, f"the stream did not open within {timeout}s")

    async def close(self) -> None:
        """Close the stream and stop; the iteration ends. Idempotent."""
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        if not self._items.finished:
            self._state("closed", None, "closed by the client")
            self._items.end()
        if self._own:
            await self.http.aclose()

    async def __aenter__(self) -> SseClient:
        try:
            await self.start()
        except BaseException:  # not opened: nothing left trying, nothing left open
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __aiter__(self) -> AsyncIterator[Item]:
        return self

    async def __anext__(self) -> Item:
        return await self._items.next()

    async def get(self, timeout: float | None = None) -> Item:
        """The next item, waiting at most ``timeout`` seconds (``TimeoutError``)."""
        return await self._items.get(timeout)

    def _state(
        self,
        state: Literal["connecting", "connected", "disconnected", "closed"],
        code: int | None = None,
        reason: str = "",
    ) -> None:
        notify(self.on_state, StateChange(state, self.base, code, reason))

    def _fail(self, error: GatewayError) -> None:
        self._state("closed", error.status, error.message or error.code)
        self._items.fail(error)

    # -- the reconnect loop ------------------------------------------------------

    async def _run(self) -> None:
        attempt = 0
        code: int | None = None
        reason = ""
        while True:
            self._state("connecting", code, reason)
            code, reason = None, ""
            opened = False
            try:
                token = await self.tokens.current()
            except GatewayError as exc:
                self._fail(exc)  # rejected and nothing can renew it
                return
            except Exception as exc:
                logger.exception("token_factory failed")
                reason = repr(exc)
            else:
                try:
                    response = await self._open(token)
                    opened = True
                    self._state("connected")
                    await self._session(response, token)
                    reason = "the stream ended"
                except GatewayError as exc:
                    self._fail(exc)
                    return
                except _Refused as exc:
                    logger.info("SSE refused (%s), retrying", exc)
                    code, reason = exc.status, str(exc)
                except httpx.HTTPError as exc:
                    logger.info("SSE stream failed: %r", exc)
                    reason = repr(exc)
                except Exception as exc:  # an event this client could not handle: start over
                    logger.exception("SSE stream failed")
                    reason = repr(exc)
            if opened:
                self._state("disconnected", code, reason)
            attempt = 0 if opened else attempt + 1
            await asyncio.sleep(
                backoff(attempt, self.min_reconnect_delay, self.max_reconnect_delay)
            )

    async def _open(self, token: str) -> httpx.Response:
        """A stream from the cursor, answered 200 (its body unread). Raises
        ``GatewayError`` for a refusal that retrying cannot fix, ``_Refused`` for one
        worth retrying, ``httpx.HTTPError``."""
        params = (*(("channel", c) for c in self.channels), ("token", token))
        headers = {"Accept": "text/event-stream"}
        if self.cursor is not None:
            headers["Last-Event-ID"] = self.cursor
            # Where each channel resumes from (for the Gap items, if it cannot).
            self.positions.update(cursor_positions(self.cursor))
        request = self.http.build_request("GET", f"{self.base}/sse", params=params, headers=headers)
        response = await self.http.send(request, stream=True)
        if response.status_code == 200:
            self.connections += 1
            return response
        try:
            await response.aread()
        finally:
            await response.aclose()
        raise self._refusal(response)

    async def _session(self, response: httpx.Response, token: str) -> None:
        """Read ``response`` until it ends, switching to a stream with a new token shortly
        before ``token`` expires (as often as it takes)."""
        reader: asyncio.Task[None] | None = None
        switch: asyncio.Task[tuple[httpx.Response, str]] | None = None
        try:
            while True:
                self._reading.set()
                reader = asyncio.create_task(self._read(response))
                switch = asyncio.create_task(self._next_stream(token))
                await asyncio.wait({reader, switch}, return_when="FIRST_COMPLETED")
                if not switch.done():
                    await _cancel(switch)
                    reader.result()  # the stream broke (raises) or ended
                    return
                await _cancel(reader)
                await response.aclose()
                response, token = switch.result()
                self.switches += 1
        finally:
            for task in (reader, switch):
                if task is not None:
                    await _cancel(task)
            if switch is not None and not switch.cancelled() and switch.exception() is None:
                opened, _ = switch.result()
                if opened is not response:
                    await opened.aclose()  # opened, then cancelled before the switch
            self._reading.set()
            await response.aclose()

    async def _read(self, response: httpx.Response) -> None:
        async for block in sse_blocks(sse_lines(response.aiter_text())):
            await self._reading.wait()  # (a switch is opening the next stream)
            self._on_block(block)
            self._opened.set()

    async def _next_stream(self, token: str) -> tuple[httpx.Response, str]:
        """Shortly before ``token`` expires: a stream opened with a new token from the
        cursor of what was delivered (the reader waits meanwhile), and that token."""
        while True:
            delay = None
            if self.tokens.factory is not None:
                delay = refresh_delay(token, self.refresh_before_expiry)
            if delay is None:
                await asyncio.Event().wait()  # no factory, or a token that never expires
            await asyncio.sleep(max(delay or 0.0, 1.0))
            try:
                fresh = await self.tokens.renew()
            except Exception:
                logger.exception("token_factory failed")
                continue
            # The reader stops before its next block: self.cursor stays that of what was
            # delivered. On success it stays stopped until _session has cancelled it.
            self._reading.clear()
            try:
                return await self._open(fresh), fresh
            except (GatewayError, _Refused, httpx.HTTPError) as exc:
                logger.info("could not switch the SSE stream to a new token: %r", exc)
                self._reading.set()

    def _refusal(self, response: httpx.Response) -> Exception:
        try:
            body = orjson.loads(response.content)
            error = body["error"]
            code, message = str(error["code"]), str(error.get("message", ""))
        except (orjson.JSONDecodeError, KeyError, TypeError):
            code, message = "internal", f"HTTP {response.status_code}"
        if response.status_code == 401:
            self.tokens.rejected = True
            if self.tokens.factory is None:
                return GatewayError(code, message, status=401)
        elif response.status_code in PERMANENT:
            return GatewayError(code, message, status=response.status_code)
        return _Refused(response.status_code, code)

    def _on_block(self, block: dict[str, str]) -> None:
        if "data" in block:
            try:
                data = orjson.loads(block["data"])
            except orjson.JSONDecodeError:
                data = None
            if isinstance(data, dict):
                self._on_event(block.get("event", "message"), data, block.get("id"))
        if "id" in block:
            self.cursor = block["id"]

    def _on_event(self, event: str, data: dict[str, Any], cursor: str | None) -> None:
        channel = data.get("channel")
        if not isinstance(channel, str):
            return
        last = self.positions.get(channel)
        if event in ("join", "leave"):
            kind: Literal["join", "leave"] = "join" if event == "join" else "leave"
            self._items.put(PresenceEvent(channel, kind, data.get("client") or {}))
        elif event == "gap":
            now = cursor_positions(cursor).get(channel) if cursor else None
            if now is not None:
                self.positions[channel] = now
            same_epoch = now is not None and last is not None and now.epoch == last.epoch
            reason: Literal["history", "epoch"] = "history" if same_epoch else "epoch"
            self._items.put(
                Gap(
                    channel,
                    reason,
                    last.epoch if last else None,
                    last.offset if last else None,
                    now.epoch if now else None,
                    now.offset if now else None,
                )
            )
        elif event == "message" and "offset" in data:
            pub = Publication(channel, int(data["offset"]), str(data["epoch"]), data.get("data"))
            if last is not None and pub.epoch == last.epoch and pub.offset <= last.offset:
                self.repeats += 1  # already delivered
                return
            self.positions[channel] = Position(pub.epoch, pub.offset)
            self._items.put(pub)


async def _cancel(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and wait for it to end, however it ends (its error is dropped)."""
    task.cancel()
    await asyncio.wait({task})
    if not task.cancelled():
        task.exception()  # retrieved: not logged as "never retrieved"
