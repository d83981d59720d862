"""Raw frame writes: the gateway's uvicorn protocol hands pushes straight to the socket.

The frames must be byte-for-byte what websockets itself would send, the fast path
must really be taken under the gateway's server (a silent fallback to ASGI would
pass every other test), and under a plain uvicorn protocol the ASGI path must
still deliver the same frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest
from websockets.exceptions import InvalidStatus
from websockets.frames import Frame, Opcode

from gateway import wire
from gateway.server.asgi import AsgiWebSocketPort
from gateway.server.upgraded import UpgradedWebSocket
from gateway.server.websocket import GatewayWebSocketProtocol
from gateway.wire import text_frame
from gateway.ws import WebSocketTransport
from tests.conftest import RunningServer, eventually, token
from tests.helpers import (
    api_client,
    api_publish,
    client_text_frame,
    raw_ws_handshake,
    read_raw_frame,
    ws_client,
)
from tests.socket_writes import CountedWrites, watch_socket_writes

pytestmark = pytest.mark.gateway_protocols  # what these tests are about


def _transports(server: RunningServer) -> list[WebSocketTransport]:
    hub = server.gateway.hub
    return [
        session._transport
        for lc in hub._channels.values()
        for session in lc.live
        if session.transport_name == "websocket"
    ]


async def test_publications_reach_the_socket_as_raw_frames(
    make_server: Callable[..., Awaitable[RunningServer]],
) -> None:
    server = await make_server(max_message_bytes=200_000)
    reader, writer = await raw_ws_handshake(server.port, token())
    try:
        writer.write(client_text_frame(b'{"id": 1, "op": "subscribe", "channel": "raw"}'))
        reply = orjson.loads((await read_raw_frame(reader))[2:])
        assert reply["ok"] is True, reply
        [transport] = await eventually(lambda: _transports(server))
        assert isinstance(transport.port, UpgradedWebSocket)  # the HTTP protocol's upgrade

        async with api_client(server) as http:
            sizes = [1, 200, 70_000]  # 7-bit, 16-bit and 64-bit length headers
            for n in sizes:
                await api_publish(http, "raw", {"pad": "p" * n})
        for offset, n in enumerate(sizes, start=1):
            frame = await read_raw_frame(reader)
            expected = orjson.dumps(
                {"channel": "raw", "offset": offset, "epoch": reply["result"]["epoch"],
                 "data": {"pad": "p" * n}}
            )  # fmt: skip
            assert frame == text_frame(expected)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_one_frame_shared_by_all_subscribers(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    watched = watch_socket_writes(monkeypatch)
    async with ws_client(server) as a, ws_client(server) as b:
        await a.subscribe("shared")
        await b.subscribe("shared")
        async with api_client(server) as http:
            await api_publish(http, "shared", {"n": 1})
        [pa] = await a.publications("shared", 1)
        [pb] = await b.publications("shared", 1)
        # The publication as the worker relayed it (the channel keeps the last ones).
        recent = server.gateway.hub._channels["shared"].recent
        assert recent is not None
        publication = recent[-1]
    assert pa == pb
    # Built once, on the publication, for both subscribers: each socket was given that
    # very frame.
    frame = publication.wire.ws
    assert frame == text_frame(orjson.dumps(pa))
    assert wire.ws_frames(publication) is frame
    upgraded = [c for c in watched.connections if c.writes[0].startswith(b"HTTP/1.1 101 ")]
    assert len(upgraded) == 2
    for connection in upgraded:
        assert [w for w in connection.writes if w is frame] == [frame]


async def test_raw_writes_off_sends_through_asgi(
    make_server: Callable[..., Awaitable[RunningServer]],
) -> None:
    server = await make_server(raw_writes=False)  # GATEWAY_RAW_WRITES=false
    async with ws_client(server) as client, api_client(server) as http:
        await client.subscribe("asgi")
        [transport] = await eventually(lambda: _transports(server))
        assert isinstance(transport.port, AsgiWebSocketPort)
        for n in range(5):
            await api_publish(http, "asgi", {"n": n})
        got = await client.publications("asgi", 5)
        assert [p["offset"] for p in got] == [1, 2, 3, 4, 5]


async def test_other_servers_get_the_asgi_path(
    make_server: Callable[..., Awaitable[RunningServer]],
) -> None:
    # uvicorn's own websockets-sansio protocol: no raw frames offered.
    server = await make_server(uvicorn_options={"ws": "websockets-sansio"})
    async with ws_client(server) as client, api_client(server) as http:
        await client.subscribe("plain")
        [transport] = await eventually(lambda: _transports(server))
        assert isinstance(transport.port, AsgiWebSocketPort)
        for n in range(20):
            await api_publish(http, "plain", {"n": n})
        got = await client.publications("plain", 20)
        assert [p["data"]["n"] for p in got] == list(range(20))
        assert [p["offset"] for p in got] == list(range(1, 21))


async def test_ws_is_answered_below_asgi_and_other_paths_still_reach_the_app(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under the gateway's protocol an upgrade to /ws never runs the ASGI app (the 101, the
    token, the checks and the connection all happen in the protocol); any other path still
    goes through the app, which refuses it as before."""
    calls: list[str] = []
    original = GatewayWebSocketProtocol.run_asgi

    async def counted(self: GatewayWebSocketProtocol) -> None:
        calls.append(self.scope["path"])
        await original(self)

    monkeypatch.setattr(GatewayWebSocketProtocol, "run_asgi", counted)
    async with ws_client(server) as client, api_client(server) as http:
        await client.subscribe("below")
        await api_publish(http, "below", {"n": 1})
        assert len(await client.publications("below", 1)) == 1
    async with ws_client(server, "not-a-token") as refused:  # accepted, then closed
        code, reason, _ = await refused.expect_close(timeout=5)
    assert (code, reason) == (4001, "unauthorized")
    assert calls == []
    with pytest.raises(InvalidStatus):  # no such route: the app answers 403
        async with ws_client(server, url=f"{server.ws_url}/nowhere?token={token()}"):
            pass
    assert calls == ["/nowhere"]


def writable(port: UpgradedWebSocket) -> bool:
    """``not port.write_paused``, read afresh (mypy would keep an earlier assertion's value)."""
    return not port.write_paused


async def on_a_socketpair() -> tuple[UpgradedWebSocket, Any, socket.socket]:
    """An ``UpgradedWebSocket`` (no keep-alive) on one end of a socket pair: the port,
    its transport and the other end, not blocking."""
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    port = UpgradedWebSocket(
        connections=set(), max_size=1 << 20, ping_interval=None, ping_timeout=None, client=None
    )
    transport, _ = await asyncio.get_running_loop().connect_accepted_socket(lambda: port, ours)
    return port, transport, theirs


async def test_an_upgraded_port_follows_its_sockets_flow_control() -> None:
    """A real socket whose peer does not read: once the transport pauses the protocol,
    ``try_write`` writes nothing and ``write`` waits; once the peer reads, the waiting
    write goes out whole, in order; after a close frame nothing more is written."""

    loop = asyncio.get_running_loop()
    port, transport, theirs = await on_a_socketpair()
    try:
        frame = text_frame(b"x" * 60_000)
        written = 0
        while port.try_write(frame):  # until the socket and the transport's buffer are full
            written += 1
            assert written < 10_000, "the transport never paused"
        assert not writable(port)
        assert port.try_write(text_frame(b"late")) is False
        waiting = asyncio.create_task(port.write(text_frame(b"last")))
        await asyncio.sleep(0)
        assert not waiting.done()
        received = bytearray()
        end = text_frame(b"last")

        async def drain() -> None:
            while not received.endswith(end):
                received.extend(await loop.sock_recv(theirs, 1 << 20))

        await asyncio.wait_for(drain(), 10)
        await asyncio.wait_for(waiting, 10)
        assert writable(port)
        assert bytes(received) == frame * written + end  # nothing of "late": refused whole
        port.refuse(1000, "")
        with pytest.raises(ConnectionError):
            port.try_write(frame)
    finally:
        transport.abort()
        theirs.close()


async def test_what_is_written_while_a_read_is_handled_goes_out_in_one_write() -> None:
    """The frames the owner writes while the protocol hands it a read's messages (a
    subscribe's reply and its recovery, replies to commands sent together) are one
    socket write, in order with the protocol's own (a pong, a close frame); a frame
    written at any other time goes out at once; a read that breaks the protocol still
    sends what was answered before its close frame."""
    from gateway.server.frames import CLOSE, PONG, close_payload, control_frame

    port, transport, theirs = await on_a_socketpair()
    counted = CountedWrites(port.transport)
    port.transport = counted  # type: ignore[assignment]

    def echo(message: dict[str, Any]) -> bool:  # the owner: answers each message twice
        if message["type"] == "websocket.receive":
            text = message["text"].encode()
            port.try_write(text_frame(b"re:" + text))
            port.try_write(text_frame(b"and:" + text))
        return True

    port.listen(lambda: None, take=echo)

    def ping(payload: bytes) -> bytes:
        return Frame(Opcode.PING, payload).serialize(mask=True)

    try:
        port.data_received(
            client_text_frame(b"a") + ping(b"p") + client_text_frame(b"b")
        )  # one read
        answers = [text_frame(b"re:a") + text_frame(b"and:a"), control_frame(PONG, b"p")]
        answers.append(text_frame(b"re:b") + text_frame(b"and:b"))
        assert counted.writes == [b"".join(answers)]
        assert port.try_write(text_frame(b"now")) and counted.writes[-1] == text_frame(b"now")

        counted.writes.clear()
        broken = client_text_frame(b"c") + bytes([0x83, 0x80]) + b"mask"  # opcode 3
        port.data_received(broken)
        close = control_frame(CLOSE, close_payload(1002, "invalid opcode"))
        assert counted.writes == [text_frame(b"re:c") + text_frame(b"and:c") + close]
        # Then the server's end (FIN), not a close with the client's bytes unread (a
        # reset); what the client still sends is dropped, for the close timeout at most.
        assert port.close_timer is not None and not transport.is_closing()
        port.data_received(client_text_frame(b"d"))
        assert counted.writes == [text_frame(b"re:c") + text_frame(b"and:c") + close]
        loop, seen = asyncio.get_running_loop(), b""
        while data := await asyncio.wait_for(loop.sock_recv(theirs, 65536), 5):
            seen += data
        assert seen.endswith(close)
    finally:
        transport.abort()
        theirs.close()


async def test_a_read_corks_a_sockets_worth_at_most() -> None:
    """Replies past ``CORK_BYTES`` in one read are not held for the read's end: what was
    corked goes out once it reaches the bound, and what follows is written at once,
    under the socket's flow control again (and so under the session's queue bound)."""
    from gateway.server.upgraded import CORK_BYTES

    port, transport, theirs = await on_a_socketpair()
    counted = CountedWrites(port.transport)
    port.transport = counted  # type: ignore[assignment]
    pad = "x" * (CORK_BYTES // 4)

    def echo(message: dict[str, Any]) -> bool:
        if message["type"] == "websocket.receive":
            for prefix in ("re:", "and:"):
                port.try_write(text_frame((prefix + message["text"] + pad).encode()))
        return True

    port.listen(lambda: None, take=echo)
    try:
        port.data_received(b"".join(client_text_frame(m) for m in (b"a", b"b", b"c")))
        frames = [text_frame(f"{p}{m}{pad}".encode()) for m in "abc" for p in ("re:", "and:")]
        assert counted.writes == [b"".join(frames[:4]), frames[4], frames[5]]
        assert len(counted.writes[0]) - len(frames[3]) < CORK_BYTES
    finally:
        transport.abort()
        theirs.close()


async def test_a_resume_is_answered_and_replayed_in_one_write(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client back on a channel the worker relays: its subscribe's reply and the
    publications it missed leave in one socket write (and reach it in one read)."""
    watched = watch_socket_writes(monkeypatch)
    async with ws_client(server) as keeper, api_client(server) as http:
        await keeper.subscribe("raw:resume")
        pubs = [await api_publish(http, "raw:resume", n) for n in range(4)]
        await keeper.publications("raw:resume", 4)  # the worker relayed them all
        reader, writer = await raw_ws_handshake(server.port, token())
        try:
            since = {"offset": pubs[0]["offset"], "epoch": pubs[0]["epoch"]}
            command = {"id": 1, "op": "subscribe", "channel": "raw:resume", "since": since}
            writer.write(client_text_frame(orjson.dumps(command)))
            frames = [orjson.loads((await read_raw_frame(reader))[2:]) for _ in range(4)]
            assert frames[0]["result"]["recovered"] is True
            assert [f["offset"] for f in frames[1:]] == [p["offset"] for p in pubs[1:]]
            writes = watched.connections[-1].writes  # the last connection made: this one
            assert len(writes) == 2 and writes[0].startswith(b"HTTP/1.1 101 ")  # the 101, then
            assert writes[1].count(b'"channel":"raw:resume"') == 3  # the reply and the three
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def test_commands_in_one_packet_are_answered_in_order_around_one_that_waits(
    server: RunningServer,
) -> None:
    """The upgraded protocol hands each message straight to the connection while none
    waits before it; a subscribe to a channel the worker does not relay yet needs the
    broker (a reader task), and what came behind it in the same packet must wait for it
    and be answered after it, in order; a later packet is then taken at once again."""
    reader, writer = await raw_ws_handshake(server.port, token())
    try:
        commands = [
            {"id": 1, "op": "ping"},
            {"id": 2, "op": "subscribe", "channel": "order:new"},  # a broker call: waits
            {"id": 3, "op": "ping"},
            {"id": 4, "op": "subscribe", "channel": "order:new"},  # already subscribed
            {"id": 5, "op": "ping"},
        ]
        writer.write(b"".join(client_text_frame(orjson.dumps(c)) for c in commands))
        replies = [orjson.loads((await read_raw_frame(reader))[2:]) for _ in commands]
        assert [r["id"] for r in replies] == [1, 2, 3, 4, 5]
        assert [r["ok"] for r in replies] == [True, True, True, False, True]
        assert replies[3]["error"]["code"] == "bad_request"
        writer.write(client_text_frame(b'{"id": 6, "op": "unsubscribe", "channel": "order:new"}'))
        writer.write(client_text_frame(b'{"id": 7, "op": "ping"}'))
        later = [orjson.loads((await read_raw_frame(reader))[2:]) for _ in range(2)]
        assert [(r["id"], r["ok"]) for r in later] == [(6, True), (7, True)]
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
