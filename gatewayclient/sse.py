"""A read-only client over Server-Sent Events (``GET /sse``, httpx streaming).

One stream carries every channel. The client keeps the last ``id:`` (the cursor, opaque,
the position of every channel) and sends it back as ``Last-Event-ID`` when it reopens
the stream: after a dropped connection, a drained worker, or the end of the stream at
the token's expiry (SSE cannot refresh a token in place: the stream is reopened with a
new one from ``token_factory``, resuming from the cursor, nothing lost). ``event: gap``
becomes a ``Gap`` item. Publications are also deduplicated by (channel, epoch, offset).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable
from typing import Any, Literal

import httpx
import orjson

from gatewayclient.errors import CLOSED, TIMEOUT, GatewayError
from gatewayclient.models import Gap, Item, Position, PresenceEvent, Publication
from gatewayclient.tokens import TokenFactory, TokenSource, backoff

logger = logging.getLogger(__name__)

_END = object()
PERMANENT = {400, 403, 404}  # a request that will not get better by retrying


def cursor_positions(cursor: str) -> dict[str, Position]:
    """The positions a cursor names, for ``Gap`` items only (the cursor is opaque: a
    format this does not understand gives no positions, never an error)."""
    found: dict[str, Position] = {}
    for entry in cursor.split(","):
        parts = entry.split("~")
        if len(parts) == 3 and parts[2].isdigit():
            found[parts[0]] = Position(parts[1], int(parts[2]))
    return found


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
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.base = url.rstrip("/")
        self.channels = list(dict.fromkeys(channels))
        self.tokens = TokenSource(token, token_factory)
        self.cursor = cursor
        self.min_reconnect_delay = min_reconnect_delay
        self.max_reconnect_delay = max_reconnect_delay
        self.connections = 0  # streams opened so far
        self.positions: dict[str, Position] = {}  # of the last publication delivered
        self._own = http is None
        self.http = http or httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None))
        self._items: asyncio.Queue[Any] = asyncio.Queue()
        self._opened = asyncio.Event()
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
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        self._items.put_nowait(_END)
        if self._own:
            await self.http.aclose()

    async def __aenter__(self) -> SseClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __aiter__(self) -> AsyncIterator[Item]:
        return self

    async def __anext__(self) -> Item:
        item = await self._items.get()
        if item is _END:
            self._items.put_nowait(item)
            raise StopAsyncIteration
        if isinstance(item, GatewayError):
            self._items.put_nowait(item)
            raise item
        assert isinstance(item, Publication | Gap | PresenceEvent)
        return item

    async def get(self, timeout: float | None = None) -> Item:
        try:
            async with asyncio.timeout(timeout):
                return await self.__anext__()
        except StopAsyncIteration:
            raise GatewayError(CLOSED, "the stream was closed") from None

    # -- the reconnect loop ------------------------------------------------------

    async def _run(self) -> None:
        attempt = 0
        while True:
            opened = False
            try:
                token = await self.tokens.current()
            except GatewayError as exc:
                self._items.put_nowait(exc)  # rejected and nothing can renew it
                return
            except Exception:
                logger.exception("token_factory failed")
            else:
                streams = self.connections
                try:
                    await self._stream(token)
                except GatewayError as exc:
                    self._items.put_nowait(exc)
                    return
                except httpx.HTTPError as exc:
                    logger.info("SSE stream failed: %r", exc)
                except Exception:  # an event this client could not handle: start over
                    logger.exception("SSE stream failed")
                opened = self.connections > streams  # however it ended
            attempt = 0 if opened else attempt + 1
            await asyncio.sleep(
                backoff(attempt, self.min_reconnect_delay, self.max_reconnect_delay)
            )

    async def _stream(self, token: str) -> None:
        """One stream, until it ends."""
        params = (*(("channel", c) for c in self.channels), ("token", token))
        headers = {"Accept": "text/event-stream"}
        if self.cursor is not None:
            headers["Last-Event-ID"] = self.cursor
            # Where each channel resumes from (for the Gap items, if it cannot).
            self.positions.update(cursor_positions(self.cursor))
        url = f"{self.base}/sse"
        async with self.http.stream("GET", url, params=params, headers=headers) as response:
            if response.status_code != 200:
                await response.aread()
                self._refused(response)
                return
            self.connections += 1
            async for block in sse_blocks(response.aiter_lines()):
                self._on_block(block)
                self._opened.set()

    def _refused(self, response: httpx.Response) -> None:
        try:
            body = orjson.loads(response.content)
            error = body["error"]
            code, message = str(error["code"]), str(error.get("message", ""))
        except (orjson.JSONDecodeError, KeyError, TypeError):
            code, message = "internal", f"HTTP {response.status_code}"
        if response.status_code == 401:
            self.tokens.rejected = True
            if self.tokens.factory is None:
                raise GatewayError(code, message, status=401)
        elif response.status_code in PERMANENT:
            raise GatewayError(code, message, status=response.status_code)
        logger.info("SSE refused (HTTP %d %s), retrying", response.status_code, code)

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
            self._items.put_nowait(PresenceEvent(channel, kind, data.get("client") or {}))
        elif event == "gap":
            now = cursor_positions(cursor).get(channel) if cursor else None
            if now is not None:
                self.positions[channel] = now
            same_epoch = now is not None and last is not None and now.epoch == last.epoch
            reason: Literal["history", "epoch"] = "history" if same_epoch else "epoch"
            self._items.put_nowait(
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
                return  # already delivered
            self.positions[channel] = Position(pub.epoch, pub.offset)
            self._items.put_nowait(pub)
