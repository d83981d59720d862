"""gateway.wire: every encoding of a push is built once and shared, and what the ports over
ASGI unwrap is exactly what was wrapped."""

from __future__ import annotations

import orjson
import pytest
from websockets.frames import Frame, Opcode

from channels.publication import Batch, PresenceEvent, Publication, StreamPosition
from gateway import cursor, wire


def publication(offset: int = 1, data: bytes = b'{"x":1}', channel: str = "c") -> Publication:
    return Publication(channel, offset, "e1", data, published_at=1.0)


def test_a_push_is_its_contract_json_encoded_once() -> None:
    pub = publication()
    encoded = wire.push_json(pub)
    assert orjson.loads(encoded) == {"channel": "c", "offset": 1, "epoch": "e1", "data": {"x": 1}}
    assert wire.push_json(pub) is encoded
    event = PresenceEvent("chat:a", "join", b'{"client":"c-1","user":"u","info":{}}')
    assert orjson.loads(wire.push_json(event)) == {
        "channel": "chat:a",
        "event": "join",
        "client": {"client": "c-1", "user": "u", "info": {}},
    }


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_text_frame_is_what_websockets_serializes(size: int) -> None:
    payload = b"x" * size
    assert wire.text_frame(payload) == Frame(Opcode.TEXT, payload).serialize(mask=False)


def test_frames_are_built_once_per_message_and_batch() -> None:
    pubs = [publication(n) for n in (1, 2, 3)]
    frame = wire.ws_frames(pubs[0])
    assert frame == wire.text_frame(wire.push_json(pubs[0]))
    assert wire.ws_frames(pubs[0]) is frame
    batch = Batch(list(pubs))
    frames = wire.ws_frames(batch)
    assert frames == b"".join(wire.ws_frames(p) for p in pubs)
    assert wire.ws_frames(batch) is frames


@pytest.mark.parametrize("sizes", [[0], [1, 125, 126], [65535, 65536, 3], [70000, 0, 200]])
def test_text_payloads_unwrap_consecutive_frames(sizes: list[int]) -> None:
    payloads = [bytes([65 + n % 26]) * size for n, size in enumerate(sizes)]
    joined = b"".join(wire.text_frame(p) for p in payloads)
    assert list(wire.text_payloads(joined)) == payloads


def test_chunks_never_hold_a_terminator_and_unwrap_exactly() -> None:
    assert wire.frame_chunk(b"x" * 300) == b"12c\r\n" + b"x" * 300 + b"\r\n"
    assert wire.frame_chunk(b"") == b""
    for size in [1, 15, 16, 255, 1023, 1024, 1025, 70_000]:  # size lines from a table below 1024
        data = b"y" * size
        assert wire.frame_chunk(data) == b"%x\r\n%s\r\n" % (size, data)
    parts = [b"a", b"\r\n\r\n", b"y" * 4097]
    assert wire.chunk_payloads(b"".join(wire.frame_chunk(p) for p in parts)) == b"".join(parts)


def test_a_one_channel_event_and_chunk_are_built_once() -> None:
    pub = publication(7)
    event = wire.single_sse(pub)
    position = cursor.encode({"c": StreamPosition(7, "e1")})
    assert event == b"id: %s\ndata: %s\n\n" % (position.encode(), wire.push_json(pub))
    chunk = wire.single_chunk(pub)
    assert chunk == wire.frame_chunk(event) and wire.single_chunk(pub) is chunk
    join = PresenceEvent("c", "join", b"{}")
    batch = Batch([pub, join])
    assert wire.single_chunk(batch) == wire.frame_chunk(event + wire.sse_presence(join))
    assert wire.single_events(batch) is wire.single_events(batch)


def test_a_one_channel_stream_resuming_over_a_shared_batch_keeps_its_position() -> None:
    """A replay's batch is shared by every stream resuming from where it starts: each
    one-channel stream writes its events as built once, and still moves its own cursor
    to the batch's last publication (what its next gap event names)."""
    from gateway.sse import SSETransport

    batch = Batch([publication(3), publication(4), PresenceEvent("c", "join", b"{}")])
    streams = [SSETransport(["c"]) for _ in range(2)]
    events = [stream.events([batch]) for stream in streams]
    per_message = b"".join(SSETransport(["c"]).events([m]) for m in batch.messages)
    assert events[0] == per_message and events[0] is events[1]
    assert all(
        stream.cursor() == cursor.encode({"c": StreamPosition(4, "e1")}) for stream in streams
    )
    several = SSETransport(["c", "d"])  # its cursor names both channels: its own events
    several.positions["d"] = StreamPosition(9, "e1")
    assert several.events([batch]).count(b"id: d~e1~9,c~e1~") == 2
    assert several.cursor() == cursor.encode({"d": StreamPosition(9, "e1"), "c": publication(4)})


def test_a_reply_is_its_json_bytes_framed_once() -> None:
    """A command's reply is the JSON of its frame (no text round trip on the way to the
    socket); a text pushed as it is is framed as its UTF-8."""
    ok, refused = (
        wire.reply(7, {"offset": 3, "epoch": "é1"}),
        wire.error_reply("x", "forbidden", "no"),
    )
    assert orjson.loads(ok) == {"id": 7, "ok": True, "result": {"offset": 3, "epoch": "é1"}}
    assert orjson.loads(refused) == {
        "id": "x",
        "ok": False,
        "error": {"code": "forbidden", "message": "no"},
    }
    assert orjson.loads(wire.reply(None, {})) == {"ok": True, "result": {}}
    assert wire.ws_frames(ok) == wire.text_frame(ok)
    assert list(wire.text_payloads(wire.ws_frames(ok) + wire.ws_frames("é"))) == [ok, "é".encode()]
