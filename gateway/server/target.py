"""A request target's path and query, split without httptools' URL parser when plain.

uvicorn splits every request's target with ``httptools.parse_url``, a C state machine
run per character: about 2 % of an SSE connect, whose target carries a token of some
hundreds of characters. For an origin-form target of printable ASCII without a ``#``
(what clients send), the parser's answer is the split at the first ``?``; anything else
still goes to it (tests/test_server_adapter.py compares the two on random targets).
"""

from __future__ import annotations

import httptools

# Printable ASCII but "#": bytes that httptools' URL parser takes as they are.
_PLAIN = bytes(b for b in range(0x21, 0x7F) if b != 0x23)


def request_target(url: bytes) -> tuple[bytes, bytes]:
    """``url``'s path and query (empty when none), as ``httptools.parse_url`` gives
    them to uvicorn (which raises ``HttpParserInvalidURLError`` for a bad one)."""
    if url[:1] == b"/" and not url.translate(None, _PLAIN):
        path, _, query = url.partition(b"?")
        return path, query
    parsed = httptools.parse_url(url)
    return parsed.path, parsed.query or b""
