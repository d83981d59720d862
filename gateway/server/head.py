"""A request head as the front door reads it (``gateway.server.front``): httptools'
callbacks keeping the URL and the headers as uvicorn keeps them, and noting, as the
headers come, what a WebSocket handshake and a stream's keep-alive need."""

from __future__ import annotations

from typing import ClassVar, Final

import httptools
from websockets import http11

from gateway.server.handover import key_of


class Head:
    """The parser's callbacks: the URL and the headers, as uvicorn keeps them, and what a
    WebSocket handshake needs of them noted as they come (``websocket_key``)."""

    # The callbacks httptools asks for and a head does not need: found (as None) in the
    # class, not missed through the instance on every parser made.
    on_message_begin: ClassVar[None] = None
    on_body: ClassVar[None] = None
    on_chunk_header: ClassVar[None] = None
    on_chunk_complete: ClassVar[None] = None

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.upgrade = self.key = self.version = b""  # the last of each
        self.upgrades = self.keys = self.versions = 0  # how many came
        self.connection: bytes | None = None  # the last Connection header
        self.long_line = False  # a header line past websockets' limit
        self.expects = False  # an Expect header came
        self.origins = 0  # how many Origin headers came
        self.body = False  # a Content-Length or Transfer-Encoding header came
        self.complete = False  # the head is in
        self.pipelined = False  # a request came before the one read last
        self.done = False  # the whole request is in
        # The parser's keep-alive answer when the head was in (llhttp forgets the request's
        # Connection header once the request is whole), with ``parser`` set to ask it.
        self.parser: httptools.HttpRequestParser | None = None
        self.keep_alive = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        known = _NAMES.get(name)
        if known is None:
            known = _name_of(name)
        name, kind = known
        # uvicorn's: llhttp keeps the trailing whitespace that RFC 9110 excludes
        if value:
            last = value[-1]
            if last == 32 or last == 9:  # a blank or a tab (rarely: a call saved)
                value = value.rstrip(b" \t")
        self.headers.append((name, value))
        if len(name) + len(value) > LINE_LIMIT:
            self.long_line = True
        if kind < 0:
            return
        if kind == 0:
            self.connection = value
        elif kind == 1:
            self.upgrade = value
            self.upgrades += 1
        elif kind == 2:
            self.key = value
            self.keys += 1
        elif kind == 3:
            self.version = value
            self.versions += 1
        elif kind == 4:
            self.expects = True
        elif kind == 5:
            self.origins += 1
        else:
            self.body = True

    def on_headers_complete(self) -> None:
        # (Not an exception to stop the parser early: httptools wraps one in another,
        # each with a traceback through its frames, several µs.)
        if self.complete:  # a second request in the same read (pipelined)
            self.pipelined = True
        self.complete = True
        if self.parser is not None:
            self.keep_alive = self.parser.should_keep_alive()

    def on_message_complete(self) -> None:
        self.done = True

    def http11(self, received: bytes, parser: httptools.HttpRequestParser) -> bool:
        """Whether the ``GET`` whose head is ``received`` (from its first byte) is HTTP/1.1:
        read from its request line when that is ``GET <url> HTTP/1.1`` CRLF, else asked
        of ``parser`` (which makes a string of the version each time). A URL holds no
        space, so the bytes after it are the version's."""
        if received.startswith(b" HTTP/1.1\r\n", 4 + len(self.url)):
            return True
        return bool(parser.get_http_version() == "1.1")

    def websocket_key(self) -> str | None:
        """The key of a handshake uvicorn would hand to its WebSocket protocol (a
        ``Connection`` listing ``upgrade``, an ``Upgrade`` of ``websocket``) and
        websockets accept as it is (``handover.websocket_key``), from what was noted;
        None for any other head. tests/test_front_door.py holds it against both."""
        connection = self.connection
        if (
            connection is None
            or self.upgrades != 1
            or self.upgrade.lower() != b"websocket"
            or self.keys != 1
            or self.versions != 1
            or self.version != b"13"
            or self.origins > 1  # websockets' 400, not the first one's check alone
            or self.body  # websockets' 400: a body is never read as frames
            or self.long_line
            or len(self.headers) > MAX_HEADERS
            or len(self.url) + 16 > MAX_LINE
            or not _lists_upgrade(connection)
        ):
            return None
        return key_of(self.key)


def _lists_upgrade(connection: bytes) -> bool:
    """Whether a ``Connection`` header's value lists ``upgrade`` (as most are: only it)."""
    lowered = connection.lower()
    return lowered == b"upgrade" or b"upgrade" in [token.strip() for token in lowered.split(b",")]


def _name_of(name: bytes) -> tuple[bytes, int]:
    """A header name as uvicorn keeps it (lower case) and what ``Head`` notes of it (the
    kind in ``_NOTED``, -1: nothing); remembered for the next head, when short."""
    lowered = name.lower()
    known = (lowered, _NOTED.get(lowered, -1))
    if len(name) <= _NAME_KEPT_BYTES:
        if len(_NAMES) >= _NAMES_KEPT:
            _NAMES.clear()
        _NAMES[name] = known
    return known


# A head larger than this is left to uvicorn's protocol (which parses as it reads, not
# keeping the bytes): websockets refuses a handshake this large anyway.
FRONT_LIMIT: Final = 16 * 1024

# The headers a handshake needs, noted by ``Head`` as they come.
_NOTED: Final = {
    b"connection": 0,
    b"upgrade": 1,
    b"sec-websocket-key": 2,
    b"sec-websocket-version": 3,
    b"expect": 4,
    b"origin": 5,
    b"content-length": 6,
    b"transfer-encoding": 6,
}
# Header names as clients write them ("Host", "Sec-WebSocket-Key") -> ``_name_of`` them:
# a few dozen in practice, one dictionary look-up per header instead of ``lower()`` and
# another. Bounded (full, it starts over), and long names are not kept.
_NAMES: Final[dict[bytes, tuple[bytes, int]]] = {}
_NAMES_KEPT: Final = 512
_NAME_KEPT_BYTES: Final = 64
# websockets' limits on the request it parses (431 / 414 when over)
MAX_HEADERS: Final = http11.MAX_NUM_HEADERS
MAX_LINE: Final = http11.MAX_LINE_LENGTH
LINE_LIMIT: Final = MAX_LINE - 4  # websockets' limit on "name: value" (CRLF included)
