"""A stream's response head as uvicorn's ``send`` writes a chunked 200, and uvicorn's
checks of its headers, remembered (``DetachableCycle.start_stream``, and the front
door's streams). Compiled (setup.py): every SSE connect writes one.
"""

from __future__ import annotations

from typing import Final

from uvicorn.protocols.http.httptools_impl import HEADER_RE, HEADER_VALUE_RE, STATUS_LINE

OK_LINE: Final = STATUS_LINE[200]


def stream_head(headers: list[tuple[bytes, bytes]], keep_alive: bool, opening: bytes) -> bytes:
    """A chunked 200's head with ``headers`` and ``opening`` as its first chunk, as
    uvicorn's ``send`` writes them."""
    content = [OK_LINE]
    for name, value in headers:
        content += [name.lower(), b": ", value, b"\r\n"]
    if not keep_alive:
        content.append(b"connection: close\r\n")
    content += [b"transfer-encoding: chunked\r\n\r\n", b"%x\r\n" % len(opening), opening]
    content.append(b"\r\n")
    return b"".join(content)


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
