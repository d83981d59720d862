"""``GET /sse`` opened below the framework: by the gateway's protocols
(``sse_opener.opener``, ``OPEN_STREAM``: asked by the front door, or by uvicorn's HTTP
protocol) or by ``sse_open.Shortcut`` in front of the app.

Each takes a request only when every check of the endpoint passes, and must then
answer exactly what the endpoint answers. Each request of a table is sent over a raw
socket to the same server once per way (the opener with cold channels, the opener on
channels the worker relays, from the front door and from uvicorn's protocol, the
shortcut, the route), and the answers (status line, headers but the date, the stream's
opening, or an error's body) must be the same bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
from collections.abc import Awaitable
from typing import Any

import pytest

from gateway import sse_open
from gateway.server.cycle import DetachableCycle
from gateway.server.front import FrontDoor
from gateway.server.head import FRONT_LIMIT
from gateway.server.http import GatewayHttpToolsProtocol
from tests.conftest import MakeServer, RunningServer, eventually, token
from tests.fake_backend import FakeBackend
from tests.redis_server import RedisServer

DATE = re.compile(rb"(?im)^date: [^\r\n]*\r\n")
TIMEOUT = 5.0


def request(target: str, headers: list[tuple[str, str]] | None = None) -> bytes:
    lines = [f"GET {target} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{name}: {value}" for name, value in headers or []]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def answer(port: int, raw: bytes) -> bytes:
    """The response head without its date, then the first chunk of a stream or the
    whole body of an error."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        length = re.search(rb"(?i)content-length: (\d+)", head)
        if length:
            body = await asyncio.wait_for(reader.readexactly(int(length[1])), TIMEOUT)
        else:  # chunked: the opening is the first chunk
            size = await asyncio.wait_for(reader.readuntil(b"\r\n"), TIMEOUT)
            body = size + await reader.readexactly(int(size, 16) + 2)
        return DATE.sub(b"", head) + body
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def cases(cursor: str) -> dict[str, bytes]:
    tok = token()
    only_a = token(subscribe=["a*"])
    return {
        "one channel": request(f"/sse?channel=news&token={tok}"),
        "two channels, one twice": request(f"/sse?channel=a1&channel=b1&channel=a1&token={tok}"),
        "from an origin": request(f"/sse?channel=news&token={tok}", [("Origin", "https://x.io")]),
        "from another origin": request(
            f"/sse?channel=news&token={tok}", [("Origin", "https://z.io")]
        ),
        "token in the header": request("/sse?channel=news", [("Authorization", f"Bearer {tok}")]),
        "Last-Event-ID": request(f"/sse?channel=news&token={tok}", [("Last-Event-ID", cursor)]),
        "last_event_id": request(f"/sse?channel=news&token={tok}&last_event_id={cursor}"),
        "percent-encoded": request(f"/sse?%63hannel=n%65ws&token={tok}"),
        "no channel": request(f"/sse?token={tok}"),
        "bad channel": request(f"/sse?channel=a%20b&token={tok}"),
        "forbidden": request(f"/sse?channel=news&token={only_a}"),
        "no token": request("/sse?channel=news", [("Origin", "https://x.io")]),
        "bad token": request("/sse?channel=news&token=nope"),
        "bad cursor": request(f"/sse?channel=news&token={tok}", [("Last-Event-ID", "%%")]),
        "not UTF-8, percent-encoded": request(f"/sse?channel=n%FFws&token={tok}"),
        "not UTF-8, raw": request(f"/sse?channel=news&token={tok}").replace(b"news", b"n\xffws"),
        "a token that is not UTF-8": request("/sse?channel=news&token=%C3%28"),
        "an empty channel": request(f"/sse?channel=&token={tok}"),
        "too many channels": request(
            "/sse?" + "&".join(f"channel=c{n}" for n in range(5)) + f"&token={tok}"
        ),
    }


class Ways:
    """Which way each request took, and the switches that send it the longer way: the
    front door's stream, the protocol's opener (at once, or once its subscribes are
    done), the app's shortcut, the framework's route."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.monkeypatch = monkeypatch
        self.taken: list[str] = []
        original_start, original_later = DetachableCycle.start_stream, DetachableCycle.open_later
        original_open = sse_open.Shortcut._open
        original_front, original_front_later = FrontDoor._start_here, FrontDoor._open_later
        later: list[object] = []

        def front(door: FrontDoor, *args: Any) -> bool:
            started = original_front(door, *args)
            if started:
                self.taken.append("front")
            return started

        def front_later(door: FrontDoor, *args: Any) -> Awaitable[None]:
            self.taken.append("front-later")
            return original_front_later(door, *args)

        def start(cycle: DetachableCycle, started: Any) -> None:
            self.taken.append("later" if started in later else "now")
            original_start(cycle, started)

        async def open_later(cycle: DetachableCycle, answer: Any) -> None:
            opened = answer.open
            answer = type(answer)(lambda: _noted(opened(), later))
            await original_later(cycle, answer)

        def shortcut(self_: sse_open.Shortcut, *args: Any) -> Awaitable[None]:
            self.taken.append("shortcut")
            return original_open(self_, *args)

        monkeypatch.setattr(DetachableCycle, "start_stream", start)
        monkeypatch.setattr(DetachableCycle, "open_later", open_later)
        monkeypatch.setattr(sse_open.Shortcut, "_open", shortcut)
        monkeypatch.setattr(FrontDoor, "_start_here", front)
        monkeypatch.setattr(FrontDoor, "_open_later", front_later)

    def without_front_door(self) -> None:
        self.monkeypatch.setattr(FrontDoor, "_stream_here", lambda *a: False)

    def without_opener(self) -> None:
        self.without_front_door()
        self.monkeypatch.setattr(GatewayHttpToolsProtocol, "_open_stream", lambda *a: False)

    def without_shortcut(self) -> None:
        self.monkeypatch.setattr(sse_open.Shortcut, "_checked", lambda self, scope: None)

    def take(self) -> list[str]:
        taken, self.taken = self.taken, []
        return taken


async def _noted(opening: Awaitable[Any], later: list[object]) -> Any:
    answer = await opening
    later.append(answer)
    return answer


async def kept_open(port: int, channels: list[str]) -> tuple[asyncio.StreamWriter, bytes]:
    """A stream left open, so that the worker relays its channels."""
    query = "&".join(f"channel={c}" for c in channels)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request(f"/sse?{query}&token={token()}"))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    return writer, head


@pytest.mark.gateway_protocols
@pytest.mark.parametrize("origins", ["https://x.io,https://y.io", "*"])
async def test_every_way_answers_the_same_bytes(
    make_server: MakeServer, monkeypatch: pytest.MonkeyPatch, origins: str
) -> None:
    """The protocol's opener (subscribing after a broker call, then at once on channels
    the worker relays; asked by the front door, then by uvicorn's protocol), the
    shortcut and the route: the same answer to every request."""
    server = await make_server(max_channels_per_connection=4, allowed_origins=origins)
    ways = Ways(monkeypatch)
    # A cursor of a stream that saw nothing: the opening of a first stream on "news".
    first = await answer(server.port, request(f"/sse?channel=news&token={token()}"))
    cursor = re.search(rb"id: (\S+)", first)
    assert cursor is not None
    assert ways.take() == ["front-later", "front"]
    table = cases(cursor[1].decode())
    # The requests of the table the endpoint answers with a stream (another origin is
    # refused, as a WebSocket's is, unless any origin is allowed).
    streams = 8 if origins == "*" else 7

    cold = {name: await answer(server.port, raw) for name, raw in table.items()}
    assert ways.take() == ["front-later", "front"] * streams
    with monkeypatch.context() as patched:
        patched.setattr(FrontDoor, "_stream_here", lambda *a: False)
        cold_protocol = {name: await answer(server.port, raw) for name, raw in table.items()}
    assert ways.take() == ["later"] * streams
    keepers = [await kept_open(server.port, ["news"]), await kept_open(server.port, ["a1", "b1"])]
    ways.take()
    live = {name: await answer(server.port, raw) for name, raw in table.items()}
    assert ways.take() == ["front"] * streams
    ways.without_front_door()
    via_protocol = {name: await answer(server.port, raw) for name, raw in table.items()}
    assert ways.take() == ["now"] * streams
    ways.without_opener()
    via_shortcut = {name: await answer(server.port, raw) for name, raw in table.items()}
    assert ways.take() == ["shortcut"] * streams
    ways.without_shortcut()
    via_route = {name: await answer(server.port, raw) for name, raw in table.items()}
    assert ways.take() == []

    for name in table:
        ways_ = (cold, cold_protocol, live, via_protocol, via_shortcut, via_route)
        assert len({way[name] for way in ways_}) == 1, name
    assert live["one channel"].startswith(b"HTTP/1.1 200 OK\r\n")
    allowed = b"*" if origins == "*" else b"https://x.io"
    assert b"access-control-allow-origin: " + allowed in live["from an origin"]
    other = live["from another origin"]
    assert (b"access-control-allow-origin" not in other) == (origins != "*")
    if origins != "*":
        assert other.startswith(b"HTTP/1.1 403") and b'"origin not allowed"' in other
    assert b"access-control-allow-origin" not in live["one channel"]
    assert live["forbidden"].startswith(b"HTTP/1.1 403")
    for writer, head in keepers:
        assert head.startswith(b"HTTP/1.1 200 OK")
        writer.close()
    await eventually(lambda: server.gateway.connections.open["sse"] == 0)


@pytest.mark.gateway_protocols
async def test_the_openers_log_line_is_the_routes(
    make_server: MakeServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Same access log line, the client behind a trusted proxy included, token redacted:
    the opener's once its subscribe is done, the front door's (on a channel the worker
    relays), uvicorn's protocol's, the app's."""
    server = await make_server()
    ways = Ways(monkeypatch)
    tok = token()
    raw = request(f"/sse?channel=news&token={tok}", [("X-Forwarded-For", "203.0.113.9")])
    lines = []
    keeper = None
    for way in ("later", "front", "now", "app"):
        if way == "now":
            ways.without_front_door()
        elif way == "app":
            ways.without_opener()
        caplog.clear()
        with caplog.at_level("INFO", logger="uvicorn.access"):
            await answer(server.port, raw)
        lines.append([r.getMessage() for r in caplog.records if r.name == "uvicorn.access"])
        if keeper is None:  # the channel relayed from here on
            keeper = await kept_open(server.port, ["news"])
            ways.take()
    assert ways.take() == ["front", "now", "shortcut"]
    assert all(len(found) == 1 for found in lines), lines
    assert len({re.sub(r":\d+ ", " ", found[0]) for found in lines}) == 1, lines
    assert lines[0][0].startswith("203.0.113.9:")
    assert tok not in lines[0][0] and "token=[redacted]" in lines[0][0]
    assert keeper is not None
    keeper[0].close()


@pytest.mark.gateway_protocols
async def test_a_client_gone_before_its_subscribe_is_answered_leaves_nothing(
    make_server: MakeServer, backend: FakeBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The subscribe hook keeps the opener waiting; the client leaves meanwhile: once the
    backend answers, the stream is forgotten and nothing is written (the front door's
    wait, then uvicorn's protocol's)."""
    server = await make_server(hooks=backend.hooks())
    ways = Ways(monkeypatch)
    for front in (True, False):
        if not front:
            ways.without_front_door()
        await _leave_while_the_backend_decides(server, backend)
        assert ways.take() == (["front-later"] if front else [])  # no stream started


async def _leave_while_the_backend_decides(server: RunningServer, backend: FakeBackend) -> None:
    backend.release.clear()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(request(f"/sse?channel=chat:hang&token={token()}"))
    await eventually(lambda: backend.pending == 1)
    assert server.gateway.connections.open["sse"] == 1
    writer.close()
    assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
    backend.release.set()
    await eventually(lambda: backend.pending == 0)
    await eventually(lambda: server.gateway.connections.open["sse"] == 0)
    await eventually(lambda: not server.server.server_state.connections)


@pytest.mark.gateway_protocols
async def test_a_broker_down_while_subscribing_is_the_routes_503(
    make_server: MakeServer, own_redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every check passes, so the opener (then the shortcut) takes the stream; Redis is
    down, so the subscribe fails: the answer is the route's 503, CORS headers included."""
    server = await make_server(broker_url=own_redis_server.url)
    own_redis_server.stop()
    ways = Ways(monkeypatch)
    raw = request(f"/sse?channel=news&token={token()}", [("Origin", "https://x.io")])
    via_opener = await answer(server.port, raw)
    ways.without_front_door()
    via_protocol = await answer(server.port, raw)
    ways.without_opener()
    via_shortcut = await answer(server.port, raw)
    ways.without_shortcut()
    assert via_opener == via_protocol == via_shortcut == await answer(server.port, raw)
    assert ways.take() == ["front-later", "shortcut"]
    via_shortcut = via_opener
    assert via_shortcut.startswith(b"HTTP/1.1 503")
    assert b"access-control-allow-origin: *" in via_shortcut
    assert b'"code":"internal"' in via_shortcut
    assert server.gateway.connections.open["sse"] == 0


@pytest.mark.gateway_protocols
async def test_a_subscribe_hooks_answers_are_the_routes(
    make_server: MakeServer, backend: FakeBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The opener waits for the subscribe hook (``OpenLater``): its refusal (with or
    without a code), its failure and its consent get the route's bytes."""
    server = await make_server(hooks=backend.hooks(), allowed_origins="https://x.io")
    ways = Ways(monkeypatch)
    origin = [("Origin", "https://x.io")]
    table = {
        channel: request(f"/sse?channel={channel}&token={token()}", origin)
        for channel in ("chat:refuse", "chat:refusecode", "chat:http500", "chat:ok")
    }
    via_opener = {name: await answer(server.port, raw) for name, raw in table.items()}
    assert ways.take() == ["front-later"] * 4 + ["front"]  # each waited; the one it allowed
    ways.without_front_door()
    via_protocol = {name: await answer(server.port, raw) for name, raw in table.items()}
    assert ways.take() == ["later"]
    ways.without_opener()
    ways.without_shortcut()
    via_route = {name: await answer(server.port, raw) for name, raw in table.items()}
    assert ways.take() == []
    for name in table:
        assert via_opener[name] == via_protocol[name] == via_route[name], name
    assert via_opener["chat:refuse"].startswith(b"HTTP/1.1 403")
    assert via_opener["chat:refusecode"].startswith(b"HTTP/1.1 404")
    assert via_opener["chat:ok"].startswith(b"HTTP/1.1 200")
    assert b"access-control-allow-origin: https://x.io" in via_opener["chat:refuse"]
    await eventually(lambda: server.gateway.connections.open["sse"] == 0)


async def _response(reader: asyncio.StreamReader) -> bytes:
    """One whole response with a Content-Length, its date dropped."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    length = re.search(rb"(?i)content-length: (\d+)", head)
    assert length is not None, head
    return DATE.sub(b"", head) + await reader.readexactly(int(length[1]))


@pytest.mark.gateway_protocols
async def test_a_stream_the_server_ends_keeps_its_connection_as_uvicorn_does(
    make_server: MakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream the server ends (its token expired) ends with the last chunk, and its
    connection lives on: a request the client sent during the stream is answered after
    it, then another one; the same bytes whether the front door or uvicorn's protocol
    opened the stream."""
    server = await make_server(jwt_leeway=0)
    ways = Ways(monkeypatch)
    keeper, _ = await kept_open(server.port, ["news"])  # relayed: streams open at once
    ways.take()
    seen = []
    for way in ("front", "now"):
        if way == "now":
            ways.without_front_door()
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(request(f"/sse?channel=news&token={token(ttl=2)}"))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        writer.write(request("/healthz"))  # during the stream
        body = await asyncio.wait_for(reader.readuntil(b"\r\n0\r\n\r\n"), TIMEOUT)
        pipelined = await _response(reader)
        writer.write(request("/healthz"))
        after = await _response(reader)
        seen.append((DATE.sub(b"", head), body, pipelined, after))
        writer.close()
    assert ways.take() == ["front", "now"]
    assert seen[0] == seen[1]
    head, body, pipelined, after = seen[0]
    assert head.startswith(b"HTTP/1.1 200 OK") and b"transfer-encoding: chunked" in head
    assert pipelined.startswith(b"HTTP/1.1 200 OK") and pipelined == after
    keeper.close()
    await eventually(lambda: server.gateway.connections.open["sse"] == 0)
    await eventually(lambda: len(server.server.server_state.connections) == 0)


@pytest.mark.gateway_protocols
async def test_a_request_sent_while_a_stream_waits_is_answered_after_the_stream(
    make_server: MakeServer, backend: FakeBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream that opens once the subscribe hook answers; the client sends another
    request meanwhile: the stream opens, ends (its token expires), then that request is
    answered on the same connection; the same bytes from the front door's wait and from
    uvicorn's protocol."""
    server = await make_server(hooks=backend.hooks(), jwt_leeway=0)
    ways = Ways(monkeypatch)
    seen = []
    for front in (True, False):
        if not front:
            ways.without_front_door()
        backend.release.clear()
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(request(f"/sse?channel=chat:hang&token={token(ttl=2)}"))
        await eventually(lambda: backend.pending == 1)
        writer.write(request("/healthz"))  # while the stream waits for the backend
        await eventually(lambda: _kept_for_later(server))
        backend.release.set()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        body = await asyncio.wait_for(reader.readuntil(b"\r\n0\r\n\r\n"), TIMEOUT)
        body = CLIENT_ID.sub(b'"client":"c-"', body)  # (presence's join names the client)
        seen.append((DATE.sub(b"", head), body, await _response(reader)))
        writer.close()
    assert ways.take() == ["front-later", "front", "later"]
    assert seen[0] == seen[1]
    assert seen[0][0].startswith(b"HTTP/1.1 200 OK")
    assert seen[0][2].startswith(b"HTTP/1.1 200 OK")
    await eventually(lambda: len(server.server.server_state.connections) == 0)


CLIENT_ID = re.compile(rb'"client":"c-[0-9a-f]+"')


def _kept_for_later(server: RunningServer) -> bool:
    """A request read by the server while its connection's stream waits: kept by the
    front door, or queued by uvicorn's protocol behind the stream's cycle."""
    for protocol in server.server.server_state.connections:
        stream = getattr(protocol, "_stream", None)
        if (stream is not None and stream.pending) or getattr(protocol, "pipeline", None):
            return True
    return False


@pytest.mark.gateway_protocols
async def test_random_stream_requests_get_the_same_answer_with_the_front_door_or_without(
    make_server: MakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests for a stream, changed at random (targets the path or query decode to
    ``/sse`` or not, HTTP/1.0, ``Connection``, ``Expect``, a body announced, headers in
    any case, bare line feeds, a head past the front door's limit), each sent in one
    write once with the front door and once with uvicorn's protocol reading it: the
    same answer, and the front door took the streams it can (checked to fail when it
    answers a head it should leave alone)."""
    server = await make_server(allowed_origins="https://x.io")
    ways = Ways(monkeypatch)
    keeper, _ = await kept_open(server.port, ["news", "a1"])  # relayed: opened at once
    ways.take()
    rng = random.Random(20261204)
    tok = token()
    targets = [
        f"/sse?channel=news&token={tok}",
        f"/sse?channel=news&channel=a1&token={tok}",
        f"/ss%65?channel=n%65ws&token={tok}",
        f"http://127.0.0.1/sse?channel=news&token={tok}",
        f"/sse/?channel=news&token={tok}",
        f"/sse?channel=news&token={tok}#part",
        f"/sse?token={tok}",
        "/sse?channel=news",
    ]
    extras = [
        ("Connection", "close"),
        ("Connection", "keep-alive"),
        ("Expect", "100-continue"),
        ("Content-Length", "0"),
        ("Content-Length", "3"),
        ("Origin", "https://x.io"),
        ("Origin", "https://z.io"),
        ("Authorization", f"Bearer {tok}"),
        ("X-Forwarded-For", "203.0.113.9"),
        ("Accept", "text/event-stream"),
        ("X-Pad", "p" * (FRONT_LIMIT + 1)),  # a head larger than the front door keeps
    ]
    fronted = 0
    for n in range(150):
        headers = [extra for extra in extras if rng.random() < 0.15]
        rng.shuffle(headers)
        if rng.random() < 0.2:
            headers = [(name.upper(), value) for name, value in headers]
        raw = request(rng.choice(targets), headers)
        if rng.random() < 0.1:
            raw = raw.replace(b"HTTP/1.1", b"HTTP/1.0", 1)
        if rng.random() < 0.05:
            raw = raw.replace(b"\r\n", b"\n")
        with_front = await answer_or_close(server.port, raw)
        taken = ways.take()
        fronted += taken == ["front"]
        assert len(raw) <= FRONT_LIMIT or taken != ["front"]
        with monkeypatch.context() as patched:
            patched.setattr(FrontDoor, "_stream_here", lambda *a: False)
            without = await answer_or_close(server.port, raw)
        assert with_front == without, (n, raw)
        assert "front" not in ways.take()
    assert fronted >= 20  # the front door answered a good share of them
    keeper.close()
    await eventually(lambda: server.gateway.connections.open["sse"] == 0)


async def answer_or_close(port: int, raw: bytes) -> bytes:
    """``answer``, or what came before the server closed the connection."""
    try:
        return await answer(port, raw)
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        partial = getattr(exc, "partial", b"")
        return b"closed after " + DATE.sub(b"", partial)
