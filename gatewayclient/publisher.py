"""The HTTP API for backends: publish, broadcast, streamed (NDJSON) publish, history,
presence. One httpx client (keep-alive connections) for every call."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from gatewayclient.errors import GatewayError
from gatewayclient.models import History, Publication, PublishResult

KEEPALIVE_EXPIRY = 4.0  # seconds; below the gateway's keep-alive timeout


@dataclass(frozen=True, slots=True)
class StreamResult:
    """What a streamed publish published: ``offset``/``epoch`` of its last publication
    (``None`` when there was none)."""

    published: int
    offset: int | None
    epoch: str | None


def http_error(response: httpx.Response, body: Any) -> GatewayError:
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        error = {"code": "internal", "message": response.text[:200]}
    return GatewayError(
        str(error.get("code", "internal")),
        str(error.get("message", "")),
        status=response.status_code,
        details=body if isinstance(body, dict) else None,
    )


async def ndjson(items: AsyncIterable[Any]) -> AsyncIterator[bytes]:
    """One JSON line per item, each sent as its own chunk as soon as it is produced."""
    async for item in items:
        yield orjson.dumps(item) + b"\n"


class Publisher:
    """``async with Publisher(url, token) as api: await api.publish("news", {...})``.

    ``token`` needs the ``publish`` claim for the channels published to (``subscribe``
    for history and presence). Errors are ``GatewayError`` with the HTTP ``status``.
    """

    def __init__(
        self,
        url: str,
        token: str,
        *,
        http: httpx.AsyncClient | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.base = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"}
        self._own = http is None
        # An idle connection is given up before the gateway's server closes it (uvicorn's
        # keep-alive timeout, 5 s): with both at 5 s a publish sent just as the server
        # closed the connection failed with a ReadError, never having reached it.
        self.http = http or httpx.AsyncClient(
            timeout=timeout, limits=httpx.Limits(keepalive_expiry=KEEPALIVE_EXPIRY)
        )

    async def aclose(self) -> None:
        if self._own:
            await self.http.aclose()

    async def __aenter__(self) -> Publisher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _json(self, response: httpx.Response) -> dict[str, Any]:
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code != 200 or not isinstance(body, dict):
            raise http_error(response, body)
        return body

    async def publish(
        self, channel: str, data: Any, *, idempotency_key: str | None = None
    ) -> PublishResult:
        """With ``idempotency_key``, a retry (same key, same channel, within the gateway's
        ``GATEWAY_IDEMPOTENCY_TTL``) is answered with the first publish's result and not
        published again."""
        body = {"channel": channel, "data": data}
        if idempotency_key is not None:
            body["idempotency_key"] = idempotency_key
        response = await self.http.post(
            f"{self.base}/api/publish",
            content=orjson.dumps(body),
            headers={**self.headers, "Content-Type": "application/json"},
        )
        body = await self._json(response)
        return PublishResult(int(body["offset"]), str(body["epoch"]))

    async def broadcast(
        self, channels: Iterable[str], data: Any, *, idempotency_key: str | None = None
    ) -> list[PublishResult]:
        """Publish ``data`` to every channel (all checked before any is published); the
        results are in the order of ``channels``. ``idempotency_key``: as for ``publish``,
        per channel."""
        body = {"channels": list(channels), "data": data}
        if idempotency_key is not None:
            body["idempotency_key"] = idempotency_key
        response = await self.http.post(
            f"{self.base}/api/broadcast",
            content=orjson.dumps(body),
            headers={**self.headers, "Content-Type": "application/json"},
        )
        body = await self._json(response)
        return [PublishResult(int(r["offset"]), str(r["epoch"])) for r in body["results"]]

    async def publish_stream(self, channel: str, items: AsyncIterable[Any]) -> StreamResult:
        """Publish each item of ``items`` as its own publication as soon as it is produced,
        over one request (``POST /api/publish/stream``, a chunked NDJSON body): the way to
        pipe an LLM's tokens into a channel. A refused line ends the request; the
        ``GatewayError``'s ``details`` then say what was published before it."""
        response = await self.http.post(
            f"{self.base}/api/publish/stream",
            params={"channel": channel},
            content=ndjson(items),
            headers={**self.headers, "Content-Type": "application/x-ndjson"},
        )
        body = await self._json(response)
        offset, epoch = body.get("offset"), body.get("epoch")
        return StreamResult(
            int(body["published"]),
            int(offset) if offset is not None else None,
            str(epoch) if epoch is not None else None,
        )

    async def history(
        self, channel: str, *, since_offset: int | None = None, limit: int | None = None
    ) -> History:
        params: dict[str, int] = {}
        if since_offset is not None:
            params["since_offset"] = since_offset
        if limit is not None:
            params["limit"] = limit
        response = await self.http.get(
            f"{self.base}/api/channels/{channel}/history", params=params, headers=self.headers
        )
        body = await self._json(response)
        epoch = str(body["epoch"])
        pubs = [
            Publication(channel, int(p["offset"]), str(p.get("epoch", epoch)), p.get("data"))
            for p in body.get("publications") or []
        ]
        return History(pubs, int(body["offset"]), epoch)

    async def presence(self, channel: str) -> list[dict[str, Any]]:
        response = await self.http.get(
            f"{self.base}/api/channels/{channel}/presence", headers=self.headers
        )
        body = await self._json(response)
        return list(body.get("clients") or [])
