"""The relay: call an OpenAI-compatible upstream with streaming on, publish each delta.

Publications on the channel, in order: ``{"type": "token", "text": …}`` per
non-empty content delta (in pieces, when one would be over the message size limit:
``completion.token_publications``), then exactly one of ``{"type": "end",
"finish_reason": …, "usage": …}`` or ``{"type": "error", "message": …}``.
The deltas of one piece of the response body (``gateway.llm.completion`` parses
them) are published together, in one broker call; a lone token goes out at once.
httpx hands the body over one HTTP chunk at a time, and an upstream writes one event
per chunk, so that batches only what an upstream (or a proxy) wrote in one chunk:
tokens that arrive while a publish is in flight are read after it, one chunk, and one
call, each. Batching those too would need the upstream read by a task of its own,
beside the one publishing; at tens of tokens per second per relay it would rarely
find two to batch.
Every way a relay can end leads to that single last publication: the
upstream finishing (``data: [DONE]``), an HTTP or connection error, a stall
longer than the upstream's timeout between two chunks, a stream that ends
without ``[DONE]``, ``DELETE /api/streams/{id}``, nobody subscribed to the
channel (on any worker) for ``GATEWAY_LLM_IDLE_CANCEL`` seconds, and a bug in
the relay itself. (Only a broker outage leaves a channel without its end.)
Cancelling leaves the ``async with client.stream(...)`` block, which closes
the upstream connection at once, so no more tokens are paid for. A cancellation the
HTTP client's internals absorb (it landed in a part of its read that defers or
swallows one) still ends the relay at the upstream's next chunk, which is checked for
a cancel reason before its tokens are published; a cancelled relay ends with the
cancel's error whatever its read raised meanwhile.

Across workers: a relay runs on the worker that accepted its ``POST``, but the
``DELETE`` may reach any worker behind the load balancer. Each relay is in the
broker's registry (``relay:<id>`` -> its channel, refreshed while it runs,
expiring ``REGISTRY_TTL`` after a worker died) and every worker listens to the
broker's signals: a worker that does not own the relay checks the registry
(unknown: 404; the token's publish permission on that channel: 403) and signals
``cancel_stream``; the owner cancels as for a local ``DELETE``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

from channels.broker import BrokerUnavailable
from channels.coalescer import batches
from channels.hub import Hub
from gateway.llm.completion import Completion, UpstreamError, http_error, token_publications
from gateway.llm.upstreams import Upstream

logger = logging.getLogger(__name__)

REGISTRY_TTL = 30.0  # a dead worker's relays leave the registry this long after
REGISTRY_REFRESH = REGISTRY_TTL / 3
STREAM_ID = re.compile(r"s-[0-9a-f]{16}")
# An upstream's line may be this long (or 8 token publications' worth, escaped), no longer.
LINE_LIMIT = 1 << 20
ERROR_BODY_LIMIT = 4096  # of an upstream's error answer, read for its message
SHOWN_CHARS = 400  # of an error an upstream gave, as published and logged


class Cancelled(Exception):
    """The relay was cancelled and its task went on: it stops at the next chunk."""


def _shown(text: str, key: str | None) -> str:
    """An upstream's words as they are published or logged: without the key it was sent
    (it may echo it), then cut to ``SHOWN_CHARS`` (cut first, the key's head would stay)."""
    return (text.replace(key, "[redacted]") if key else text)[:SHOWN_CHARS]


def registry_key(stream_id: str) -> str:
    return f"relay:{stream_id}"


@dataclass(slots=True)
class Relay:
    stream_id: str
    channel: str
    upstream: Upstream
    task: asyncio.Task[None] | None = None
    cancel_reason: str = ""
    finishing: bool = False  # its final publication is under way: too late to cancel
    tokens: int = 0
    started: float = field(default_factory=time.monotonic)


class RelayManager:
    """Owns every relay of this worker (strong references, crashes logged, idempotent close)."""

    def __init__(
        self,
        hub: Hub,
        upstreams: dict[str, Upstream],
        *,
        idle_cancel: float,
        client: httpx.AsyncClient,
        max_bytes: int = 65_536,
    ) -> None:
        self.hub = hub
        self.upstreams = upstreams
        self.idle_cancel = idle_cancel
        self.max_bytes = max_bytes  # a token publication's limit: longer texts are split
        self.client = client
        self.relays: dict[str, Relay] = {}
        hub.signals.listen(self._on_signal)

    async def spawn(self, channel: str, upstream: Upstream, request: dict[str, Any]) -> Relay:
        """Register the relay (so that any worker can cancel it), then start it.

        Raises ``BrokerUnavailable`` (nothing started) when it cannot be registered.
        """
        relay = Relay("s-" + secrets.token_hex(8), channel, upstream)
        await self._register(relay)
        relay.task = asyncio.create_task(self._run(relay, request), name=f"relay:{relay.stream_id}")
        self.relays[relay.stream_id] = relay
        relay.task.add_done_callback(lambda task: self._done(relay, task))
        return relay

    def _done(self, relay: Relay, task: asyncio.Task[None]) -> None:
        self.relays.pop(relay.stream_id, None)
        if not task.cancelled() and task.exception() is not None:
            logger.error("relay %s crashed", relay.stream_id, exc_info=task.exception())

    def cancel(self, stream_id: str, reason: str = "cancelled") -> bool:
        """Stop the relay; False when there is none or it is already publishing its end.

        Cancelling during that last publish would interrupt it and leave the
        channel with no final publication at all.
        """
        relay = self.relays.get(stream_id)
        if relay is None or relay.task is None or relay.finishing:
            return False
        relay.cancel_reason = relay.cancel_reason or reason
        relay.task.cancel()
        return True

    async def _register(self, relay: Relay) -> None:
        key = registry_key(relay.stream_id)
        await self.hub.signals.register(key, relay.channel.encode(), REGISTRY_TTL)

    async def channel_elsewhere(self, stream_id: str) -> str | None:
        """The channel of a relay another worker runs; None when there is no such relay.

        Raises ``BrokerUnavailable``.
        """
        if not STREAM_ID.fullmatch(stream_id):
            return None
        value = await self.hub.signals.lookup(registry_key(stream_id))
        return None if value is None else value.decode()

    async def cancel_elsewhere(self, stream_id: str, reason: str = "cancelled") -> None:
        """Ask every worker to cancel ``stream_id``: its owner does.

        Raises ``BrokerUnavailable``.
        """
        signal = {"op": "cancel_stream", "stream_id": stream_id, "reason": reason}
        await self.hub.signals.signal(orjson.dumps(signal))

    def _on_signal(self, data: bytes) -> None:
        try:
            signal = orjson.loads(data)
        except orjson.JSONDecodeError:
            logger.warning("malformed signal: %.80r", data)
            return
        if not isinstance(signal, dict) or signal.get("op") != "cancel_stream":
            return  # someone else's
        stream_id, reason = signal.get("stream_id"), signal.get("reason")
        if isinstance(stream_id, str) and stream_id in self.relays:
            self.cancel(stream_id, reason if isinstance(reason, str) else "cancelled")

    async def start(self) -> None:
        """Nothing to start: relays start with their requests."""

    async def close(self) -> None:
        """Cancel every relay (each still publishes its end), then close the HTTP client."""
        tasks = [r.task for r in self.relays.values() if r.task is not None]
        for stream_id in list(self.relays):
            self.cancel(stream_id, "cancelled: gateway shutting down")
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        await self.client.aclose()

    async def _publish(self, channel: str, value: dict[str, Any]) -> None:
        await self.hub.publish(channel, orjson.dumps(value))

    async def _relay_tokens(
        self, relay: Relay, completion: Completion, text: str, *, last: bool = False
    ) -> None:
        """Publish the tokens of the lines ``text`` completes, together (one broker call,
        ``Hub.publish_many``); at a bad line, those before it, then its ``UpstreamError``."""
        tokens: list[str] = []
        try:
            completion.feed(text, tokens, last=last)
        finally:
            datas = [data for token in tokens for data in token_publications(token, self.max_bytes)]
            for batch in batches(datas):
                await self.hub.publish_many(relay.channel, batch)
                relay.tokens += len(batch)

    async def _run(self, relay: Relay, request: dict[str, Any]) -> None:
        try:
            await self._relay(relay, request)
        finally:
            with contextlib.suppress(BrokerUnavailable):  # else it expires by itself
                await self.hub.signals.unregister(registry_key(relay.stream_id))

    async def _relay(self, relay: Relay, request: dict[str, Any]) -> None:
        watcher = asyncio.create_task(self._watch_idle(relay), name=f"idle:{relay.stream_id}")
        final: dict[str, Any]
        try:
            final = await self._stream(relay, request)
        except (asyncio.CancelledError, Cancelled) as exc:
            # Absorbed on purpose: a cancelled relay still publishes its error. Only
            # cancel() cancels this task, and it refuses once `finishing` is set.
            task = asyncio.current_task()
            if isinstance(exc, asyncio.CancelledError) and task is not None:
                task.uncancel()
            final = {"type": "error", "message": relay.cancel_reason or "cancelled"}
        except httpx.TimeoutException:
            final = {
                "type": "error",
                "message": f"upstream {relay.upstream.name!r} stalled: no data for "
                f"{relay.upstream.timeout:g} s",
            }
        except httpx.HTTPError as exc:
            # The exception's text (addresses, the client's internals) goes to the log.
            what = "unreachable" if isinstance(exc, httpx.ConnectError) else "connection failed"
            message = f"upstream {relay.upstream.name!r} {what} ({exc.__class__.__name__})"
            logger.warning("relay %s: %s: %s", relay.stream_id, message, exc)
            final = {"type": "error", "message": message}
        except UpstreamError as exc:
            message = _shown(str(exc), relay.upstream.api_key)
            if exc.detail:  # an upstream may echo the key it was sent
                said = _shown(exc.detail, relay.upstream.api_key)
                logger.warning("relay %s: %s; it said: %s", relay.stream_id, message, said)
            final = {"type": "error", "message": message}
        except BrokerUnavailable:
            logger.warning("relay %s: broker unavailable, stream abandoned", relay.stream_id)
            return
        except Exception:  # a bug must not leave subscribers waiting for an end forever
            logger.exception("relay %s failed", relay.stream_id)
            final = {"type": "error", "message": "relay failed: internal error"}
        finally:
            watcher.cancel()
        if relay.cancel_reason and final["type"] == "error":
            # Cancelled, and the read ended otherwise meanwhile (a stall, a connection
            # error the client's internals made of the cancellation): as cancelled.
            final = {"type": "error", "message": relay.cancel_reason}
        if final["type"] == "end" and len(orjson.dumps(final)) > self.max_bytes:
            # An upstream's usage (or finish reason) past the size limit: not published.
            final = {"type": "end", "finish_reason": None, "usage": {}}
        relay.finishing = True
        try:
            await self._publish(relay.channel, final)
        except BrokerUnavailable:
            logger.warning("relay %s: could not publish its %s", relay.stream_id, final["type"])

    async def _stream(self, relay: Relay, request: dict[str, Any]) -> dict[str, Any]:
        upstream = relay.upstream
        headers = {"accept": "text/event-stream"}
        if upstream.api_key:
            headers["authorization"] = f"Bearer {upstream.api_key}"
        body = {**request, "stream": True}
        timeout = httpx.Timeout(upstream.timeout, connect=min(upstream.timeout, 10.0))
        async with self.client.stream(
            "POST",
            f"{upstream.url}/chat/completions",
            content=orjson.dumps(body),
            headers={**headers, "content-type": "application/json"},
            timeout=timeout,
        ) as response:
            if response.status_code >= 400:
                said = b""
                async for piece in response.aiter_bytes():  # not a body without bound
                    said += piece
                    if len(said) >= ERROR_BODY_LIMIT:
                        break
                raise http_error(upstream.name, response.status_code, said[:ERROR_BODY_LIMIT])
            completion = Completion(upstream.name, line_limit=max(LINE_LIMIT, 8 * self.max_bytes))
            async for text in response.aiter_text():  # one HTTP chunk (or read)
                if relay.cancel_reason:  # cancelled, and the task did not see it
                    raise Cancelled
                await self._relay_tokens(relay, completion, text)
                if completion.done:
                    return completion.end()
            await self._relay_tokens(relay, completion, "", last=True)
            if completion.done:
                return completion.end()
        raise UpstreamError(f"upstream {upstream.name!r} ended the stream without [DONE]")

    async def _watch_idle(self, relay: Relay) -> None:
        """Cancel the relay once its channel has had no subscriber anywhere for idle_cancel s;
        meanwhile keep its registry entry alive."""
        interval = min(1.0, self.idle_cancel / 4)
        idle_since: float | None = time.monotonic()  # a grace period for the first subscriber
        registered = time.monotonic()
        while True:
            await asyncio.sleep(interval)
            if time.monotonic() - registered >= REGISTRY_REFRESH:
                with contextlib.suppress(BrokerUnavailable):
                    await self._register(relay)
                    registered = time.monotonic()
            try:
                watched = await self.hub.has_subscribers(relay.channel)
            except BrokerUnavailable:
                continue
            now = time.monotonic()
            if watched:
                idle_since = None
            elif idle_since is None:
                idle_since = now
            elif now - idle_since >= self.idle_cancel:
                self.cancel(
                    relay.stream_id, f"cancelled: no subscribers for {self.idle_cancel:g} s"
                )
                return
