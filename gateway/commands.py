"""Parse WebSocket command frames into typed commands.

``parse_command`` either returns a ``Command`` or raises ``BadFrame``. A frame
that is not a JSON object of the contract's shape (bad JSON, not an object,
missing or unknown ``op``, a field of the wrong type) is *malformed* and counts
toward ``GATEWAY_MAX_BAD_FRAMES``; a well-formed command naming an invalid
channel is rejected with ``bad_request`` too but is not counted (see
docs/protocol.md).
"""

from __future__ import annotations

from typing import Any, Final

import orjson

from channels.names import is_valid_channel
from channels.publication import MAX_OFFSET, StreamPosition

CommandId = int | str | None

OPS: Final = frozenset(
    {"subscribe", "unsubscribe", "publish", "presence", "history", "ping", "refresh", "rpc"}
)
CHANNEL_OPS: Final = frozenset({"subscribe", "unsubscribe", "publish", "presence", "history"})


class BadFrame(Exception):
    def __init__(self, message: str, id: CommandId = None, *, malformed: bool = True) -> None:
        super().__init__(message)
        self.message = message
        self.id = id
        self.malformed = malformed


def _encoded(data: object, id: CommandId) -> bytes:
    """``data`` as JSON again: orjson reads 1,024 levels of nesting, writes 254."""
    try:
        return orjson.dumps(data)
    except orjson.JSONEncodeError:
        raise BadFrame("'data' is nested too deeply", id) from None


class Command:
    """One parsed command. A plain class, not a dataclass: compiled (setup.py), its
    ``__init__`` is native, where a dataclass's is generated Python (a frozen one's sets
    each field through ``object.__setattr__``: a tenth of a connect's instructions went
    to the three made per connect)."""

    def __init__(
        self,
        op: str,
        id: CommandId = None,
        channel: str = "",  # rpc: the method
        since: StreamPosition | None = None,
        limit: int | None = None,
        data: bytes = b"null",  # publish: the payload, re-encoded once with orjson
        token: str = "",
    ) -> None:
        self.op: Final = op
        self.id: Final = id
        self.channel: Final = channel
        self.since: Final = since
        self.limit: Final = limit
        self.data: Final = data
        self.token: Final = token

    def _fields(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in _FIELDS)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Command):
            return NotImplemented
        return self._fields() == other._fields()

    def __repr__(self) -> str:
        return f"Command({', '.join(f'{name}={getattr(self, name)!r}' for name in _FIELDS)})"


_FIELDS = ("op", "id", "channel", "since", "limit", "data", "token")  # equality, repr


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_since(value: Any, id: CommandId) -> StreamPosition | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise BadFrame("'since' must be an object {offset, epoch}", id)
    offset, epoch = value.get("offset"), value.get("epoch")
    if not isinstance(offset, int) or isinstance(offset, bool) or not 0 <= offset <= MAX_OFFSET:
        raise BadFrame("'since.offset' must be an integer from 0 to 2^63-1", id)
    if not isinstance(epoch, str):
        raise BadFrame("'since.epoch' must be a string", id)
    return StreamPosition(offset, epoch)


def parse_command(frame: str | bytes) -> Command:
    try:
        message = orjson.loads(frame)
    except orjson.JSONDecodeError:
        raise BadFrame("frame is not valid JSON") from None
    if not isinstance(message, dict):
        raise BadFrame("frame must be a JSON object")
    raw_id = message.get("id")
    id: CommandId = raw_id if (_is_int(raw_id) or isinstance(raw_id, str)) else None
    if raw_id is not None and id is None:
        raise BadFrame("'id' must be an integer or a string")
    op = message.get("op")
    if not isinstance(op, str):
        raise BadFrame("'op' is required and must be a string", id)
    if op not in OPS:
        raise BadFrame(f"unknown op {op[:32]!r}", id)

    if op == "ping":
        return Command(op, id)
    if op == "refresh":
        tok = message.get("token")
        if not isinstance(tok, str) or not tok:
            raise BadFrame("'token' must be a non-empty string", id)
        return Command(op, id, token=tok)

    if op == "rpc":
        method = message.get("method")
        if not isinstance(method, str):
            raise BadFrame("'method' is required and must be a string", id)
        if not is_valid_channel(method):
            raise BadFrame("invalid method name", id, malformed=False)
        return Command(op, id, method, data=_encoded(message.get("data"), id))

    channel = message.get("channel")
    if not isinstance(channel, str):
        raise BadFrame("'channel' is required and must be a string", id)
    if not is_valid_channel(channel):
        raise BadFrame("invalid channel name", id, malformed=False)

    if op == "publish":
        if "data" not in message:
            raise BadFrame("'data' is required", id)
        return Command(op, id, channel, data=_encoded(message["data"], id))
    since = _parse_since(message.get("since"), id) if op in ("subscribe", "history") else None
    limit = None
    if op == "history":
        limit = message.get("limit")
        if limit is not None and (not _is_int(limit) or limit < 0):
            raise BadFrame("'limit' must be a non-negative integer", id)
    return Command(op, id, channel, since=since, limit=limit)
