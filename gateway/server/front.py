"""The protocol a connection gets: the gateway's HTTP protocol, made in two steps, with a
WebSocket upgrade, or an SSE stream that opens at once, answered from a lean head
before the second.

Most of what a WebSocket connect cost in uvicorn's HTTP protocol was the protocol, not
the handshake: per connection its parser, flow control, the two addresses and the
scheme; per request an ASGI scope with a copy of the lifespan state (for a request
that never reaches ASGI) and a header list built by a Python call per header, each
checked for ``Expect``. ``FrontDoor`` starts with only the transport and its places
among the server's connections and the head deadlines. Its first read:

- holds an ``Upgrade:`` header: read by a parser of its own that keeps the URL and the
  headers (``Head``), over as many reads as the head takes. A WebSocket upgrade that
  uvicorn would hand to its WebSocket protocol, whose handshake websockets would accept
  as it is (``handover.websocket_key``) and which the app's opener answers at once, is
  answered here: the 101 written and the connection handed to the lean WebSocket
  protocol, as ``AnswersUpgrades`` does (with the frames the client sent behind the head,
  which uvicorn's protocol drops);
- is a whole ``GET /sse`` head and nothing more: read by the same parser, and a stream
  the app's stream opener opens, at once or once its subscribes are done
  (``_open_later``), is started here (``_stream_here``), on a ``FrontStream``; the
  protocol becomes uvicorn's if the server ends the stream and the connection is kept
  alive, or if the answer after a wait is an error response for uvicorn's cycle;
- anything else (no upgrade, an upgrade the app answers later or not at all, bytes the
  parser refuses, a head past ``FRONT_LIMIT`` or its deadline): the protocol is made
  uvicorn's in full (``_parsing``, ``_connected``) and its parser given every byte read
  so far, so that it answers them as if it had read them itself: the same codes,
  headers and logs, nothing lost or read twice (and a stream opener's answer, when it
  was asked here, is handed on: it is not asked twice).

A first read without the header (a head split before it, or written ``UPGRADE:``) is
uvicorn's at once, and an upgrade in it is still answered below ASGI, by
``AnswersUpgrades``. The stock-protocol mode (``GATEWAY_RAW_WRITES=false``) does not use
this class.
"""

from __future__ import annotations

import asyncio
from functools import partial

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.server.front_sse import start_here, stream_here
from gateway.server.front_stream import FrontStream, outcome
from gateway.server.front_upgrade import answer_upgrade
from gateway.server.head import FRONT_LIMIT, Head
from gateway.server.headwait import HEAD_DEADLINES, HeadDeadlines
from gateway.server.http import MAX_HEAD, GatewayHttpToolsProtocol
from gateway.server.ports import (
    Deferred,
    OpenLater,
    Respond,
    Started,
)


class FrontDoor(GatewayHttpToolsProtocol):
    """uvicorn's HTTP protocol (the gateway's), made in two steps: until the first read
    shows a request that is not a WebSocket upgrade answered here, only what every
    connection needs (its transport, its place among the server's connections and the
    head deadlines); the rest (``_parsing``, ``_connected``) once it is uvicorn's."""

    begun = False  # uvicorn's protocol state made (``_begin``)
    loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # until _parsing
    _received = b""  # an upgrade's head so far
    _head: Head | None = None  # and its parser, while one is read here
    _parser: httptools.HttpRequestParser | None = None
    # The response to a GET /sse read here: started, or waiting for the app to open it.
    _stream: FrontStream | None = None
    parses_at_once = False  # ``_begin`` makes uvicorn's parsing state, when needed

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.connections.add(self)
        self.transport = transport
        self.head_deadlines: HeadDeadlines | None = self.app_state.get(HEAD_DEADLINES)
        if self.head_deadlines is not None:
            self.head_deadlines.start(self)

    def _begin(self) -> None:
        """Become uvicorn's protocol in full; the caller hands it what was read."""
        self.begun = True
        self._parsing(self.loop)
        self._connected(self.transport)

    def data_received(self, data: bytes) -> None:
        if self.begun:  # uvicorn's (not ``super()``: in a call per read, it costs)
            self._parse_http(data)
            return
        upgraded = self.upgraded
        if upgraded is not None:  # handed over here (``AnswersUpgrades._switch``)
            upgraded.data_received(data)
            return
        stream = self._stream
        if stream is not None:  # after a request whose stream is opened here
            stream.received(data)
            return
        parser = self._parser
        if parser is not None:
            received = self._received + data
        # "Upgrade:" or "upgrade:". (``find``, not ``in``: bytes' ``in`` first tries its
        # operand as an integer, and makes and drops a TypeError.)
        elif data.find(b"pgrade:") >= 0:
            received = data
            self._head = Head()
            parser = self._parser = httptools.HttpRequestParser(self._head)
        elif data.startswith(b"GET /sse") and self._stream_here(data):
            return
        else:
            # A first read with no Upgrade header (as clients write it) is not parsed
            # here at all. (One split over reads, or written "UPGRADE:", is uvicorn's,
            # whose protocol answers upgrades too: ``AnswersUpgrades``.)
            self._begin()
            self._parse_http(data)
            return
        self._received = received
        head = self._head
        assert head is not None
        try:
            if len(received) > FRONT_LIMIT:
                raise httptools.HttpParserError
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            if head.pipelined:  # behind another request: uvicorn's, which answers in order
                self._to_http()
                return
            # A whole upgrade head: answered here, or left to uvicorn's parser.
            after = data[upgrade.args[0] :] if upgrade.args else b""
            answer_upgrade(self, head, parser, received, after)
            return
        except httptools.HttpParserError:
            self._to_http()
            return
        if head.complete:  # a request that is no upgrade
            self._to_http()

    def _parse_http(self, data: bytes) -> None:
        """uvicorn's parser, with a bound on a request head (``MAX_HEAD``)."""
        if self.head_refused:
            return
        if self.reading_head:
            before = self.head_read
            self.head_read += len(data)
            # What follows the head in the same read (a body) is not the head's.
            end = data.find(b"\r\n\r\n") if self.head_read > MAX_HEAD else -1
            if end >= 0 and before + end + 4 > MAX_HEAD:
                self.head_too_large()
                return
        HttpToolsProtocol.data_received(self, data)
        # A head still not whole past the limit (its end not in this read; one read more at
        # most is parsed). A request begun in this read after another counts from its
        # first byte: 0 here.
        if self.reading_head and self.head_read > MAX_HEAD and not self.head_refused:
            self.head_too_large()

    def _stream_here(self, data: bytes) -> bool:
        """A first read holding a whole ``GET /sse`` head and nothing after it, which
        uvicorn would hand to the app's stream opener as it is: the opener asked here,
        and a stream it opens at once started here (``FrontStream``), written as
        ``DetachableCycle.start_stream`` writes it. False when uvicorn's protocol is to
        read it: told the opener's answer, if it was asked (``stream_asked``)."""
        return stream_here(self, data)

    def _start_here(
        self,
        answer: Started,
        raw_path: bytes,
        query: bytes,
        headers: list[tuple[bytes, bytes]],
        stream: FrontStream | None = None,
    ) -> bool:
        """Start ``answer``'s stream here, as ``DetachableCycle.start_stream`` starts one;
        False, with nothing done, when its headers are not ones uvicorn would write (its
        cycle then answers)."""
        return start_here(self, answer, raw_path, query, headers, stream)

    async def _open_later(
        self,
        later: OpenLater,
        stream: FrontStream,
        request: bytes,
        raw_path: bytes,
        query: bytes,
        headers: list[tuple[bytes, bytes]],
    ) -> None:
        """``DetachableCycle.open_later`` for a request read here: the stream started here
        once the app's ``open`` is done, nothing when the client left meanwhile; an error
        response (or a failure) is uvicorn's to answer, its protocol told the outcome. The
        ``stream`` keeps, meanwhile, what the client sends and the server's shutdown."""
        failure: Exception | None = None
        answer: Started | Respond | None = None
        try:
            answer = await later.open()
        except Exception as exc:
            failure = exc
        if stream.gone or self.transport.is_closing():
            if answer is not None and not isinstance(answer, Respond):
                await answer.abandon()
            return
        if (
            answer is not None
            and not isinstance(answer, Respond)
            and self._start_here(answer, raw_path, query, headers, stream)
        ):
            return
        self._stream = None
        # Read again by uvicorn's protocol, whose cycle then answers with the outcome.
        self.stream_asked, self.stream_answer = True, OpenLater(partial(outcome, answer, failure))
        self._begin()
        if stream.pending:
            self.transport.resume_reading()
        self._parse_http(request + stream.pending)
        if not stream.keep_alive and self.cycle is not None:
            self.cycle.keep_alive = False  # the server shut down meanwhile

    def stream_ended(self, pending: bytes, keep_alive: bool) -> None:
        """The stream's last chunk is out (``FrontStream.finish``): the connection closed,
        or kept alive by uvicorn's protocol from here, given what the client sent."""
        self._stream = None
        if not keep_alive:
            self.server_state.total_requests += 1
            self.transport.close()
            return
        self._begin()
        self.on_response_complete()  # counted, and the keep-alive timeout armed
        if pending:
            self.transport.resume_reading()
            self._parse_http(pending)

    def shutdown(self) -> None:
        stream = self._stream
        if stream is not None:  # closed once the app ends the stream (its drain does)
            stream.keep_alive = False
        else:
            super().shutdown()

    def _to_http(self, decided: Deferred | None = None) -> None:
        """uvicorn's from here: everything read so far handed to its parser."""
        received = self._received
        if self._parser is not None:  # (an upgrade's head kept so far)
            del self._received, self._head, self._parser
        self._begin()
        if decided is not None:
            self.decided = decided
        self._parse_http(received)

    def head_timed_out(self) -> None:
        if not self.begun:
            self._to_http()
        super().head_timed_out()

    def connection_lost(self, exc: Exception | None) -> None:
        upgraded = self.upgraded
        if upgraded is not None:  # (not through ``super()``: a call more per connection)
            upgraded.connection_lost(exc)
        elif self.begun:
            GatewayHttpToolsProtocol.connection_lost(self, exc)
        elif self._stream is not None:  # during a stream opened (or to open) here
            self.connections.discard(self)
            stream, self._stream = self._stream, None
            stream.lost()
            self.__dict__.clear()
        else:  # gone before its first request head was read
            self.connections.discard(self)
            if self.head_deadlines is not None:
                self.head_deadlines.done(self)
            self.__dict__.clear()

    def pause_writing(self) -> None:
        if self.begun or self.upgraded is not None:
            super().pause_writing()
        elif self._stream is not None:
            self._stream.pause_writing()

    def resume_writing(self) -> None:
        if self.begun or self.upgraded is not None:
            super().resume_writing()
        elif self._stream is not None:
            self._stream.resume_writing()
