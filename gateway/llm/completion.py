"""An OpenAI-style streamed chat completion, read as it arrives: its lines, tokens and end.

No I/O here: the relay feeds each piece of text it reads from the upstream and gets
back the token texts of the lines that piece completed, so that the tokens that arrive
together are published together.

Lines end at CR, LF or CRLF, the event-stream rule. (httpx's ``aiter_lines`` splits
like ``str.splitlines``, also at U+2028, U+0085 and other characters that a JSON
string may hold raw - as orjson and many servers write them - and so broke such a
token's line into two pieces of invalid JSON.)
"""

from __future__ import annotations

import re
from typing import Any

import orjson

_LINE_END = re.compile(r"\r\n|\r|\n")


class UpstreamError(Exception):
    """The upstream misbehaved; the message is published to subscribers, ``detail``
    (what the upstream said that subscribers are not shown) only logged."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


# Statuses whose error message is about the request (too long, unknown model, rate
# limited), and so worth showing to the subscribers of its answer. Any other status is
# about the upstream or the gateway's own key (401, 403, 5xx): its text may name
# accounts, keys, hosts, and tells a subscriber nothing they could act on.
_REQUEST_STATUSES = frozenset({400, 404, 408, 409, 413, 422, 429})


def error_message(error: Any) -> str:
    """The text of an OpenAI-style ``error`` (``{"message": …}`` or a string), whole: it
    may echo the key the gateway sent, which the relay takes out before it cuts it."""
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    return error if isinstance(error, str) else "error"


def http_error(upstream: str, status: int, body: bytes) -> UpstreamError:
    """An upstream's HTTP error answer: the status for everyone, its message only when
    it is about the request; the body for the log either way."""
    detail = body.decode(errors="replace")
    message = f"upstream {upstream!r} answered HTTP {status}"
    if status in _REQUEST_STATUSES:
        try:
            said = error_message(orjson.loads(body).get("error"))
        except (orjson.JSONDecodeError, AttributeError):
            said = detail
        message = f"{message}: {said}"
    return UpstreamError(message, detail)


def token_publications(text: str, limit: int) -> list[bytes]:
    """``{"type": "token", "text": …}`` for ``text``, in as many pieces as keep each
    publication within ``limit`` bytes (cut between characters, halves of halves: the
    pieces' texts joined are ``text``). ``limit`` must leave room for one character's
    publication (the settings' minimum, 64 bytes, does)."""
    data = orjson.dumps({"type": "token", "text": text})
    if len(data) <= limit or len(text) < 2:
        return [data]
    half = len(text) // 2
    return token_publications(text[:half], limit) + token_publications(text[half:], limit)


class Completion:
    """What the upstream said so far: ``feed`` it text, it returns tokens; ``done`` once
    ``data: [DONE]`` was read, then ``end()`` is the final publication. A line longer than
    ``line_limit`` characters is an ``UpstreamError`` (not kept waiting for its end)."""

    __slots__ = ("_rest", "done", "finish_reason", "line_limit", "upstream", "usage")

    def __init__(self, upstream: str, line_limit: int = 1 << 20) -> None:
        self.upstream = upstream
        self.line_limit = line_limit
        self.finish_reason: str | None = None
        self.usage: Any = None
        self.done = False
        self._rest = ""  # the start of a line whose end has not arrived

    def end(self) -> dict[str, Any]:
        return {"type": "end", "finish_reason": self.finish_reason, "usage": self.usage or {}}

    def feed(self, text: str, tokens: list[str], *, last: bool = False) -> None:
        """Append to ``tokens`` the token texts of the lines ``text`` completes (``last``:
        the response ended, its last line too), up to ``[DONE]``. Raises ``UpstreamError``
        at a bad line, with the tokens of the lines before it appended."""
        text = self._rest + text
        # A CR at the very end may be the first half of a CRLF: keep it for later.
        cut = len(text) - 1 if text.endswith("\r") and not last else len(text)
        lines = _LINE_END.split(text[:cut])
        self._rest = "" if last else lines.pop() + text[cut:]
        for line in lines:
            if len(line) > self.line_limit:
                raise self._too_long()
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                self.done = True
                return
            try:
                chunk = orjson.loads(payload)
            except orjson.JSONDecodeError:
                raise UpstreamError(f"upstream {self.upstream!r} sent invalid JSON") from None
            if not isinstance(chunk, dict):
                continue
            if isinstance(chunk.get("error"), dict | str):
                said = error_message(chunk["error"])
                raise UpstreamError(f"upstream {self.upstream!r} error: {said}", payload)
            self.usage = chunk.get("usage") or self.usage
            choices = chunk.get("choices")
            for choice in choices if isinstance(choices, list) else ():
                if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                    continue
                delta = choice.get("delta") or {}
                content = delta.get("content") if isinstance(delta, dict) else None
                if isinstance(content, str) and content:
                    tokens.append(content)
                self.finish_reason = choice.get("finish_reason") or self.finish_reason
        if len(self._rest) > self.line_limit:  # a line that never ends is not kept growing
            raise self._too_long()

    def _too_long(self) -> UpstreamError:
        self._rest = ""
        return UpstreamError(
            f"upstream {self.upstream!r} sent a line over {self.line_limit} characters"
        )
