"""``POST /api/publish/stream`` (NDJSON), ``POST /api/streams`` and ``DELETE /api/streams/{id}``."""

from __future__ import annotations

import contextlib
import logging
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Query, Request
from starlette.requests import ClientDisconnect, HTTPConnection

from channels.broker import BrokerUnavailable
from channels.coalescer import batches
from channels.publication import Publication
from gateway.access import checked_channel, require
from gateway.bodies import Draining, chunks_until_drained, encoded, json_object
from gateway.deps import ClaimsDep, GatewayDep, PublisherDep
from gateway.errors import ErrorCode, GatewayError, JSONBody
from gateway.llm.relay import RelayManager

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/api", default_response_class=JSONBody)


async def get_relays(conn: HTTPConnection) -> RelayManager:
    relays: RelayManager = conn.app.state.relays  # set by gateway.llm.install
    return relays


RelaysDep = Annotated[RelayManager, Depends(get_relays)]


def _stream_result(published: int, last: Publication | None) -> dict[str, Any]:
    return {
        "published": published,
        "offset": last.offset if last else None,
        "epoch": last.epoch if last else None,
    }


@router.post("/publish/stream")
async def publish_stream(
    request: Request,
    gateway: GatewayDep,
    claims: PublisherDep,
    channel: Annotated[str, Query()],
) -> JSONBody:
    """Each NDJSON line becomes one publication as soon as it has arrived.

    The lines that arrive together (one chunk of the body) are published together, in
    one broker call (up to the coalescer's limits): a fast producer costs a round trip
    per chunk, not per line, and a lone line goes out at once. A bad line stops the
    stream with an error naming its line number; the lines before it stay published
    (those of its chunk too) and the body says how many.
    """
    if len(request.query_params.getlist("channel")) > 1:  # not the last one, silently
        raise GatewayError(ErrorCode.BAD_REQUEST, "one 'channel' per streamed publish")
    checked_channel(channel)
    require(claims.can_publish(channel), "publishing to", channel)
    limit = gateway.settings.max_message_bytes
    published, line_no = 0, 0
    last: Publication | None = None
    pending = bytearray()

    def checked(line: bytes) -> bytes | None:
        """The line's JSON re-encoded; None for a blank line."""
        if not line.strip():
            return None
        if len(line) - line.endswith(b"\r") > limit:  # a CRLF line's CR is not its data's
            raise GatewayError(ErrorCode.TOO_LARGE, f"line {line_no}: over {limit} bytes")
        try:
            value = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise GatewayError(ErrorCode.BAD_REQUEST, f"line {line_no}: not valid JSON") from None
        data = encoded(value, f"line {line_no}")
        if len(data) > limit:  # as written again: 1e5 is 100000.0
            raise GatewayError(ErrorCode.TOO_LARGE, f"line {line_no}: over {limit} bytes")
        return data

    def complete_lines() -> tuple[list[bytes], GatewayError | None]:
        """The complete lines of ``pending``, checked, up to the first bad one and its error."""
        nonlocal line_no
        datas: list[bytes] = []
        start = 0
        try:
            while (end := pending.find(b"\n", start)) >= 0:
                line_no += 1
                if (data := checked(bytes(pending[start:end]))) is not None:
                    datas.append(data)
                start = end + 1
            del pending[:start]
            if len(pending) > limit + 1:  # more than a line and its CR can be
                line_no += 1
                raise GatewayError(ErrorCode.TOO_LARGE, f"line {line_no}: over {limit} bytes")
        except GatewayError as exc:
            return datas, exc
        return datas, None

    async def publish(datas: list[bytes]) -> None:
        nonlocal published, last
        for batch in batches(datas):
            publications = await gateway.hub.publish_many(channel, batch)
            published += len(publications)
            last = publications[-1]

    try:
        async with contextlib.aclosing(chunks_until_drained(request, gateway)) as chunks:
            async for chunk in chunks:  # (closed when a bad line ends it: no longer a reader)
                pending += chunk
                datas, error = complete_lines()
                await publish(datas)  # the lines before a bad one too
                if error is not None:
                    raise error
        if pending:
            line_no += 1
            if (data := checked(bytes(pending))) is not None:
                await publish([data])
    except GatewayError as exc:
        body = exc.body() | _stream_result(published, last)
        return JSONBody(body, status_code=exc.status)
    except BrokerUnavailable:
        error = GatewayError.unavailable()
        return JSONBody(error.body() | _stream_result(published, last), status_code=503)
    except Draining:  # the lines after these were not read: the backend sends them elsewhere
        error = GatewayError.unavailable("the gateway is shutting down: send the rest elsewhere")
        return JSONBody(error.body() | _stream_result(published, last), status_code=503)
    except ClientDisconnect:
        # The backend went away mid-body: what it sent stays published, nobody reads a reply.
        logger.info("streamed publish to %s: client went away after %d lines", channel, published)
        return JSONBody(_stream_result(published, last), status_code=400)
    return JSONBody(_stream_result(published, last))


@router.post("/streams", status_code=202)
async def start_stream(
    request: Request, gateway: GatewayDep, relays: RelaysDep, claims: PublisherDep
) -> JSONBody:
    """A relay is publishing through the API: ``GATEWAY_API_PUBLISH_RATE`` counts its start."""
    body = await json_object(request, gateway.settings.llm_max_request_bytes)
    channel = checked_channel(body.get("channel"))
    require(claims.can_publish(channel), "publishing to", channel)
    name = body.get("upstream", "default")
    upstream = relays.upstreams.get(name) if isinstance(name, str) else None
    if upstream is None:
        raise GatewayError(ErrorCode.BAD_REQUEST, f"unknown upstream {str(name)[:64]!r}")
    llm_request = body.get("request", {})
    if not isinstance(llm_request, dict):
        raise GatewayError(ErrorCode.BAD_REQUEST, "'request' must be a JSON object")
    encoded(llm_request, "'request'")  # sent on as JSON: a 400 now, not the relay's error
    try:
        relay = await relays.spawn(channel, upstream, llm_request)
    except BrokerUnavailable:
        raise GatewayError.unavailable() from None
    return JSONBody({"stream_id": relay.stream_id, "channel": channel}, status_code=202)


@router.delete("/streams/{stream_id}")
async def cancel_stream(stream_id: str, relays: RelaysDep, claims: ClaimsDep) -> JSONBody:
    relay = relays.relays.get(stream_id)
    if relay is not None:
        require(claims.can_publish(relay.channel), "cancelling a stream of", relay.channel)
        # False when the relay was already publishing its end (too late to cancel).
        cancelled = relays.cancel(stream_id, "cancelled by request")
        return JSONBody({"stream_id": stream_id, "cancelled": cancelled})
    # Another worker's relay (or none): see gateway/llm/relay.py.
    try:
        channel = await relays.channel_elsewhere(stream_id)
        if channel is None:
            raise GatewayError(ErrorCode.NOT_FOUND, "no such stream")
        require(claims.can_publish(channel), "cancelling a stream of", channel)
        await relays.cancel_elsewhere(stream_id, "cancelled by request")
    except BrokerUnavailable:
        raise GatewayError.unavailable() from None
    return JSONBody({"stream_id": stream_id, "cancelled": True})
