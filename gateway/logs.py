"""Logging set-up, and the filter that keeps tokens out of every log line.

uvicorn logs request lines with their query string (``GET /sse?token=...``)
on ``uvicorn.access`` and WebSocket handshakes on ``uvicorn.error``. The
filter replaces every ``token=`` query value, ``Bearer`` credential and
anything shaped like a JWT before a handler formats the record.
"""

from __future__ import annotations

import copy
import functools
import http
import logging
import re
from typing import Any, Final
from urllib.parse import unquote_plus

from uvicorn.logging import AccessFormatter, DefaultFormatter

REDACTED = "[redacted]"
# A record's attribute (``extra={REDACTED_ALREADY: True}``): its message and arguments
# hold no token, or were redacted by the caller; the filters leave it as it is.
REDACTED_ALREADY: Final = "gateway_redacted"
# Its name after a separator, a blank or a quote (a query string's repr: ``b'token=…``).
_TOKEN_PARAM = re.compile(r"(?i)((?:^|[?&;\s'\"])(?:access_)?token=)[^&\s\"']*")
_BEARER = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+")
_TOKEN_KEY = re.compile(r"([\"'](?:access_)?token[\"']\s*:\s*[\"'])[^\"']*")  # JSON, a dict
# JWTs anywhere, whole or truncated by a frame logger ("eyJhbGc...Zk2"): header onwards.
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{2,}[A-Za-z0-9_.~+/=-]*(?:\.\.\.|…)?[A-Za-z0-9_.~+/=-]*")
# A query parameter whose name has percent-escapes (``%74oken=`` is ``token=`` to the
# gateway's query parser): redacted when its decoded name is a token's.
_ESCAPED_PARAM = re.compile(
    r"(?i)((?:^|[?&;\s'\"])((?:[a-z0-9_]|%[0-9a-f]{2})*%[0-9a-f]{2}(?:[a-z0-9_]|%[0-9a-f]{2})*)=)([^&\s\"']*)"
)
_TOKEN_NAMES: Final = frozenset({"token", "access_token"})


def redact(text: str) -> str:
    """``text`` with every token replaced by ``REDACTED``. Each pattern runs only when the
    text holds what it must start with (a WebSocket or SSE request line, the common case,
    runs one): a regular expression scans every position of the text it is given."""
    lowered = text.lower()
    if "token=" in lowered:
        text = _TOKEN_PARAM.sub(_keep_name, text)
    if "bearer" in lowered:
        text = _BEARER.sub(_keep_name, text)
    if 'token"' in lowered or "token'" in lowered:
        text = _TOKEN_KEY.sub(_keep_name, text)
    if "eyJ" in text:  # what is left of a JWT once the named ones are gone
        text = _JWT.sub(REDACTED, text)
    if "%" in text and "=" in text:
        text = _ESCAPED_PARAM.sub(_escaped_token, text)
    return text


def _keep_name(match: re.Match[str]) -> str:
    return match.group(1) + REDACTED


def _escaped_token(match: re.Match[str]) -> str:
    name = unquote_plus(match.group(2)).lower()
    return match.group(1) + REDACTED if name in _TOKEN_NAMES else match.group(0)


class _Redacted:
    """A log argument that is not text (a dict such as an ASGI scope, bytes, a frame):
    formatted as itself, redacted."""

    __slots__ = ("value",)

    def __init__(self, value: object) -> None:
        self.value = value

    def __str__(self) -> str:
        return redact(str(self.value))

    def __repr__(self) -> str:
        return redact(repr(self.value))


_PLAIN: Final = (int, float, type(None))  # arguments that cannot hold a token

# websockets at debug (under stock uvicorn it logs through "uvicorn.error"): each frame
# ("< %s": "TEXT '{…}' [n bytes]", cut to its head and tail, so a token's tail can be
# left with neither its name nor its "eyJ") and each handshake header (a session
# cookie, an API key). A frame is written as its kind and size; a header's value only
# for the headers of the handshake itself.
_FRAME_LINES: Final = frozenset({"< %s", "> %s"})
_HEADER_LINES: Final = frozenset({"< %s: %s", "> %s: %s"})
_SHOWN_HEADERS: Final = frozenset(
    {
        "host",
        "upgrade",
        "connection",
        "origin",
        "user-agent",
        "date",
        "server",
        "content-type",
        "content-length",
        "cache-control",
        "pragma",
        "accept-encoding",
        "accept-language",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-accept",
        "sec-websocket-protocol",
    }
)


# What uvicorn logs as the server's error, with a traceback, that is a client's doing (a
# text frame that is not UTF-8, under stock uvicorn's WebSocket protocol, which closes it
# 1007): a warning without the traceback, or any client could fill the error log.
_CLIENT_FAULTS: Final = frozenset({"Invalid UTF-8 sequence received from client."})


def _as_client_fault(record: logging.LogRecord) -> None:
    if record.levelno >= logging.ERROR and record.msg in _CLIENT_FAULTS:
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.exc_info = record.exc_text = None


def _frame(arg: object) -> object:
    opcode, data = getattr(arg, "opcode", None), getattr(arg, "data", None)
    if opcode is None or not isinstance(data, bytes | bytearray | memoryview):
        return _redacted(arg)
    return f"{getattr(opcode, 'name', opcode)} [{len(data)} bytes]"


def _websockets_line(record: logging.LogRecord) -> bool:
    """Whether ``record`` is a websockets frame or header line, made safe if so."""
    msg, args = record.msg, record.args
    if not isinstance(msg, str) or not isinstance(args, tuple):
        return False
    if msg in _FRAME_LINES and len(args) == 1:
        record.args = (_frame(args[0]),)
        return True
    if msg in _HEADER_LINES and len(args) == 2:
        name, value = args
        shown = isinstance(name, str) and name.lower() in _SHOWN_HEADERS
        record.args = (_redacted(name), _redacted(value) if shown else REDACTED)
        return True
    return False


def _redacted(arg: object) -> object:
    if isinstance(arg, str):
        return redact(arg)
    return arg if isinstance(arg, _PLAIN) else _Redacted(arg)


class RedactTokens(logging.Filter):
    """Redacts the message template and each argument (formatters such as uvicorn's
    access formatter read ``record.args`` themselves): strings at once, anything else
    (an ASGI scope at uvicorn's trace level, a websockets frame) when it is formatted."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.__dict__.get(REDACTED_ALREADY):
            return True
        record.__dict__[REDACTED_ALREADY] = True  # one pass per record, whatever filters
        if isinstance(record.msg, str):
            _as_client_fault(record)
        if _websockets_line(record):
            return True
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(_redacted(a) for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: _redacted(v) for k, v in record.args.items()}
        return True


def redaction_filter() -> RedactTokens:
    """The filter of ``log_config``'s handlers, built in each process that applies it.

    It also tells the logging module not to look up each record's source file, line and
    thread (a stack walk per record: a twentieth of a WebSocket connect's CPU): the
    gateway's formatters, uvicorn's, print none of them (the logging HOWTO's
    "Optimization" section).
    """
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    if hasattr(logging, "logAsyncioTasks"):  # Python 3.12+: the current task's name
        logging.logAsyncioTasks = False  # type: ignore[attr-defined,unused-ignore]
    return RedactTokens()


_FILTER = RedactTokens()
_GUARDED = ("uvicorn.access", "uvicorn.error", "uvicorn", "httpx", "gateway", "channels", "")


def install_redaction() -> None:
    """Attach the filter to the loggers that may see URLs, and to the root handlers."""
    for name in _GUARDED:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
        for handler in logger.handlers:
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)


class LeanFormatter(DefaultFormatter):
    """uvicorn's default formatter; without colours it does not copy each record.

    uvicorn's copies every record to add its ``levelprefix`` (``INFO:     ``), which
    was a twentieth of a WebSocket connect's CPU (its accepted line). Without colours
    the prefix can be set on the record itself: the same text, no copy.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:
        if self.use_colors:
            return super().formatMessage(record)
        levelname = record.levelname
        record.__dict__["levelprefix"] = levelname + ":" + " " * (8 - len(levelname))
        return logging.Formatter.formatMessage(self, record)


class LeanAccessFormatter(AccessFormatter):
    """uvicorn's access formatter; without colours it copies no record.

    uvicorn's copies each request's record twice (its own fields, then the level
    prefix): with the lookup of the status phrase, three quarters of the cost of an
    access line, itself a sixth of an SSE connect's CPU. Without colours the fields can
    be set on the record itself: the same text.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:
        if self.use_colors or not isinstance(record.args, tuple) or len(record.args) != 5:
            return super().formatMessage(record)
        client_addr, method, full_path, http_version, status_code = record.args
        fields = record.__dict__
        fields["client_addr"] = client_addr
        fields["request_line"] = f"{method} {full_path} HTTP/{http_version}"
        fields["status_code"] = _status_line(int(status_code))  # type: ignore[call-overload]
        levelname = record.levelname
        fields["levelprefix"] = levelname + ":" + " " * (8 - len(levelname))
        return logging.Formatter.formatMessage(self, record)


@functools.lru_cache(maxsize=64)
def _status_line(status_code: int) -> str:
    """``200 OK``: uvicorn's ``AccessFormatter.get_status_code`` without colours."""
    try:
        return f"{status_code} {http.HTTPStatus(status_code).phrase}"
    except ValueError:
        return f"{status_code} "


def log_config(level: str = "info") -> dict[str, Any]:
    """uvicorn's logging config, plus our packages' loggers, with redaction on every handler."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["filters"] = {"redact": {"()": "gateway.logs.redaction_filter"}}
    config["formatters"]["default"]["()"] = "gateway.logs.LeanFormatter"
    config["formatters"]["access"]["()"] = "gateway.logs.LeanAccessFormatter"
    for handler in config["handlers"].values():
        handler["filters"] = ["redact"]
    for name in ("gateway", "channels", "auth"):
        config["loggers"][name] = {
            "handlers": ["default"],
            "level": level.upper(),
            "propagate": False,
        }
    return config
