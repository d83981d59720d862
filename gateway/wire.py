"""The wire: pushes and replies as WebSocket frames and SSE events, each built once.

A push is the same bytes for every subscriber: its JSON (``{"channel", "offset",
"epoch", "data"}``), its WebSocket text frame (server frames are never masked), its
SSE event on a one-channel stream (whose ``id:`` depends on that publication only)
and that event framed as an HTTP/1.1 chunk. Each is built on first use and kept in
the message's ``wire`` slot (an ``Encoded``), so a publication with 5,000
subscribers is encoded once, not 5,000 times. A ``Batch`` keeps its joined frames
and chunk the same way.

SSE events of a stream with several channels carry that stream's own cursor and are
built per stream (``sse_publication``).

The ports over plain ASGI (``gateway.server.asgi``) take the same bytes and unwrap
them again (``text_payloads``, ``chunk_payloads``): a transport writes one form
whatever the server under it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any, Final

import orjson

from channels.broker import HistoryPage
from channels.publication import Batch, Message, PresenceEvent, Publication, compact
from gateway import cursor
from gateway.commands import CommandId
from gateway.server.response_head import chunk

Push = Publication | PresenceEvent

HEARTBEAT: Final = ": ping\n\n"
_TEXT: Final = 0x81  # FIN + text opcode


class Encoded:
    """What the wire module built for one message (or batch); None until first needed."""

    def __init__(self) -> None:
        self.json: bytes | None = None
        self.ws: bytes | None = None
        self.sse: bytes | None = None
        self.chunk: bytes | None = None


def _encoded(item: Message | Batch) -> Encoded:
    cache: Encoded | None = item.wire
    if cache is None:
        cache = item.wire = Encoded()
    return cache


# -- JSON ----------------------------------------------------------------------------


def push_json(message: Push) -> bytes:
    """The push as JSON, encoded once per message."""
    cache = _encoded(message)
    data = cache.json
    if data is None:
        if isinstance(message, Publication):
            push: dict[str, Any] = {
                "channel": message.channel,
                "offset": message.offset,
                "epoch": message.epoch,
                "data": orjson.Fragment(message.data),
            }
        else:
            push = {
                "channel": message.channel,
                "event": message.event,
                "client": orjson.Fragment(message.client),
            }
        data = cache.json = compact(orjson.dumps(push))
    return data


def reply(id: CommandId, result: Any) -> bytes:
    """A command's successful reply (JSON: the payload of its text frame)."""
    body: dict[str, Any] = {} if id is None else {"id": id}
    body["ok"] = True
    body["result"] = result
    return orjson.dumps(body)


def error_reply(id: CommandId, code: str, message: str) -> bytes:
    """A command's error reply: ``{"id", "ok": false, "error": {"code", "message"}}``."""
    body: dict[str, Any] = {} if id is None else {"id": id}
    body["ok"] = False
    body["error"] = {"code": code, "message": message}
    return orjson.dumps(body)


# -- WebSocket -------------------------------------------------------------------------


def text_frame(payload: bytes) -> bytes:
    """An unmasked, unfragmented text frame (server to client) carrying ``payload``."""
    size = len(payload)
    if size < 126:
        return bytes((_TEXT, size)) + payload
    if size < 65536:
        return struct.pack("!BBH", _TEXT, 126, size) + payload
    return struct.pack("!BBQ", _TEXT, 127, size) + payload


def ws_frames(item: Push | Batch | bytes | str) -> bytes:
    """``item``'s text frame(s): a push's and a batch's are built once and shared."""
    if isinstance(item, bytes):  # a reply, for one client
        return text_frame(item)
    if isinstance(item, str):  # a text as it is
        return text_frame(item.encode())
    cache = item.wire
    if cache is not None and cache.ws is not None:  # the hot path: built already
        return cache.ws  # type: ignore[no-any-return]
    if isinstance(item, Batch):
        frames = b"".join([ws_frames(message) for message in item.messages])
    else:
        frames = text_frame(push_json(item))
    _encoded(item).ws = frames
    return frames


def text_payloads(frames: bytes) -> Iterator[bytes]:
    """The payloads of consecutive frames made by ``text_frame``."""
    view, at = memoryview(frames), 0
    while at < len(view):
        size, at = view[at + 1], at + 2
        if size == 126:
            (size,), at = struct.unpack_from("!H", view, at), at + 2
        elif size == 127:
            (size,), at = struct.unpack_from("!Q", view, at), at + 8
        yield bytes(view[at : at + size])
        at += size


# -- SSE ---------------------------------------------------------------------------------


def frame_chunk(data: bytes) -> bytes:
    """``data`` as one HTTP/1.1 chunk (``response_head.chunk``).

    Empty data gives no bytes at all: a zero-size chunk would end the response.
    """
    return chunk(data) if data else b""


def chunk_payloads(chunks: bytes) -> bytes:
    """The data of consecutive chunks made by ``frame_chunk``, joined."""
    parts, at = [], 0
    while at < len(chunks):
        line_end = chunks.index(b"\r\n", at)
        size = int(chunks[at:line_end], 16)
        start = line_end + 2
        parts.append(chunks[start : start + size])
        at = start + size + 2
    return b"".join(parts)


def sse_opening(retry_ms: int, position_cursor: str) -> bytes:
    """A stream's first bytes: the reconnect delay and the cursor it starts from."""
    return b"retry: %d\nid: %s\n\n" % (retry_ms, position_cursor.encode())


def sse_retry(retry_ms: int) -> bytes:
    """A block that only sets the client's reconnect delay (no event is dispatched)."""
    return b"retry: %d\n\n" % retry_ms


def sse_publication(stream_cursor: str, publication: Publication) -> bytes:
    return b"id: %s\ndata: %s\n\n" % (stream_cursor.encode(), push_json(publication))


def sse_presence(event: PresenceEvent) -> bytes:
    return b"event: %s\ndata: %s\n\n" % (event.event.encode(), push_json(event))


def sse_gap(stream_cursor: str, channel: str) -> bytes:
    data = orjson.dumps({"channel": channel})
    return b"event: gap\nid: %s\ndata: %s\n\n" % (stream_cursor.encode(), data)


def single_sse(publication: Publication) -> bytes:
    """The event of ``publication`` on a one-channel stream (its cursor is this
    publication's position alone), built once for every such stream."""
    cache = _encoded(publication)
    event = cache.sse
    if event is None:
        position = cursor.encode({publication.channel: publication.position})
        event = cache.sse = sse_publication(position, publication)
    return event


def single_chunk(item: Publication | Batch) -> bytes:
    """``single_sse`` of a publication, or of each message of a batch of one channel,
    framed as one HTTP/1.1 chunk; built once for every one-channel stream."""
    cache = item.wire
    if cache is not None and cache.chunk is not None:  # the hot path: built already
        return cache.chunk  # type: ignore[no-any-return]
    events = single_sse(item) if isinstance(item, Publication) else single_events(item)
    chunk = _encoded(item).chunk = frame_chunk(events)
    return chunk


def single_events(batch: Batch) -> bytes:
    """The events of ``batch`` on a one-channel stream, unframed (a resume's, in the
    stream's opening); built once for every such stream."""
    cache = _encoded(batch)
    events = cache.sse
    if events is None:
        events = cache.sse = b"".join(
            [
                single_sse(m) if isinstance(m, Publication) else sse_presence(m)
                for m in batch.messages
            ]
        )
    return events


def history_body(page: HistoryPage) -> dict[str, Any]:
    """A history page as the WebSocket reply's result and the API's body carry it."""
    return {
        "publications": [pub.history_entry() for pub in page.publications],
        "offset": page.position.offset,
        "epoch": page.position.epoch,
    }
