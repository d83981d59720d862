"""A request target's path and query, split without httptools' URL parser when plain.

uvicorn splits every request's target with ``httptools.parse_url``, a C state machine
run per character: about 2 % of an SSE connect, whose target carries a token of some
hundreds of characters. For an origin-form target of ASCII without a ``#`` (what
clients send), the parser's answer is the split at the first ``?``; anything else still
goes to it (tests/test_server_adapter.py compares the two on random targets that the
request parser lets through: it refuses spaces, control characters and DEL in a URL).
"""

from __future__ import annotations

from typing import Any

import httptools


def request_target(url: bytes) -> tuple[bytes, bytes]:
    """``url``'s path and query (empty when none), as ``httptools.parse_url`` gives
    them to uvicorn (which raises ``HttpParserInvalidURLError`` for a bad one). ``url``
    is a request line's, as httptools' request parser accepted it."""
    # ``isascii`` and ``find`` look at words, not bytes: tens of instructions where a
    # check of each byte took thousands on a long target.
    if url[:1] == b"/" and url.isascii() and url.find(b"#") < 0:
        path, _, query = url.partition(b"?")
        return path, query
    # (Read as ``Any``: httptools' stub says ``query: bytes``, but it is None when there
    # is none, and compiled code would insist on the stub's type.)
    parsed: Any = httptools.parse_url(url)
    parsed_query: bytes | None = parsed.query
    return parsed.path, parsed_query or b""
