"""A stream's response head as uvicorn's ``send`` writes a chunked 200, and uvicorn's
checks of its headers, remembered (``DetachableCycle.start_stream``, and the front
door's streams, whose heads are remembered whole: ``stream_start``). Compiled
(setup.py): every SSE connect writes one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, Generic, TypeVar

from uvicorn.protocols.http.httptools_impl import HEADER_RE, HEADER_VALUE_RE, STATUS_LINE

OK_LINE: Final = STATUS_LINE[200]

T = TypeVar("T")
DefaultHeaders = list[tuple[bytes, bytes]]


class MadeFrom(Generic[T]):
    """What a head makes of uvicorn's default headers (the 101's last lines, a stream's
    heads), kept for the list it was made from: the server makes a new list once a
    second (its date in it), the same list for every response meanwhile."""

    def __init__(self, make: Callable[[DefaultHeaders], T]) -> None:
        self._make = make
        self._of: object = None  # held: its id is not another list's while it is kept
        self._made: T | None = None

    def get(self, default_headers: DefaultHeaders) -> T:
        made = self._made
        if made is None or self._of is not default_headers:
            made = self._made = self._make(default_headers)
            self._of = default_headers
        return made


def stream_head(headers: list[tuple[bytes, bytes]], keep_alive: bool, opening: bytes) -> bytes:
    """A chunked 200's head with ``headers`` and ``opening`` as its first chunk, as
    uvicorn's ``send`` writes them."""
    head = _head(headers, keep_alive)
    return head + chunk(opening) if opening else head


def _head(headers: list[tuple[bytes, bytes]], keep_alive: bool) -> bytes:
    content = [OK_LINE]
    for name, value in headers:
        content += [name.lower(), b": ", value, b"\r\n"]
    if not keep_alive:
        content.append(b"connection: close\r\n")
    content.append(b"transfer-encoding: chunked\r\n\r\n")
    return b"".join(content)


def stream_start(
    default_headers: list[tuple[bytes, bytes]], headers: list[tuple[bytes, bytes]]
) -> bytes | None:
    """The head of a kept-alive chunked 200 with uvicorn's ``default_headers`` and then
    ``headers``, through its blank line, as ``stream_head`` writes it; None when
    uvicorn's ``send`` would refuse one of them (``valid_headers``). Remembered: a
    stream's headers are the same few, and uvicorn's change once a second (a new list,
    its date in it), which starts the heads over."""
    heads = _HEADS.get(default_headers)
    key = tuple(headers)
    head = heads.get(key)
    if head is None:
        lines = [*default_headers, *headers]
        if not valid_headers(lines):
            return None
        if len(heads) >= _HEADS_LIMIT:
            heads.clear()
        head = heads[key] = _head(lines, True)
    return head


def chunk(data: bytes) -> bytes:
    """``data`` (not empty: a zero-size chunk ends a body) as one chunk of a chunked
    body: hex size line, the bytes, CRLF."""
    size = len(data)
    line = _SIZE_LINES[size] if size < _SIZE_LINES_KEPT else b"%x\r\n" % size
    return line + data + b"\r\n"


def _no_heads(default_headers: DefaultHeaders) -> dict[tuple[tuple[bytes, bytes], ...], bytes]:
    return {}


_HEADS: Final = MadeFrom(_no_heads)  # a stream's headers -> its whole head
_HEADS_LIMIT: Final = 256  # heads of one second: one per origin the CORS headers name
_SIZE_LINES_KEPT: Final = 1024  # a size line of an event (or of a batch of them), made once
_SIZE_LINES: Final = [b"%x\r\n" % size for size in range(_SIZE_LINES_KEPT)]

_VALID_HEADERS: Final[set[tuple[bytes, bytes]]] = set()  # checked already: the same each stream
_VALID_HEADERS_LIMIT: Final = 1024


def valid_headers(headers: list[tuple[bytes, bytes]]) -> bool:
    """What uvicorn's ``send`` checks of each header, remembered: a stream's headers are
    the same few (uvicorn's date changes once a second, CORS's origin with the client)."""
    return _VALID_HEADERS.issuperset(headers) or all(map(_valid_header, headers))


def _valid_header(header: tuple[bytes, bytes]) -> bool:
    if header in _VALID_HEADERS:
        return True
    name, value = header
    if HEADER_RE.search(name) or HEADER_VALUE_RE.search(value):
        return False
    if len(_VALID_HEADERS) >= _VALID_HEADERS_LIMIT:
        _VALID_HEADERS.clear()
    _VALID_HEADERS.add(header)
    return True
