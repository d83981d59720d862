"""Logging set-up, and the filter that keeps tokens out of every log line.

uvicorn logs request lines with their query string (``GET /sse?token=...``)
on ``uvicorn.access`` and WebSocket handshakes on ``uvicorn.error``. The
filter replaces every ``token=`` query value, ``Bearer`` credential and
anything shaped like a JWT before a handler formats the record.
"""

from __future__ import annotations

import copy
import logging
import re
from typing import Any

from uvicorn.logging import DefaultFormatter

REDACTED = "[redacted]"
# A record's attribute (``extra={REDACTED_ALREADY: True}``): its message and arguments
# hold no token, or were redacted by the caller; the filters leave it as it is.
REDACTED_ALREADY = "gateway_redacted"
_PATTERNS = (
    re.compile(r"(?i)((?:^|[?&;\s])(?:access_)?token=)[^&\s\"']*"),
    re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+"),
    re.compile(r"(\"(?:access_)?token\"\s*:\s*\")[^\"]*"),
    # JWTs anywhere, whole or truncated by a frame logger ("eyJhbGc...Zk2"): header onwards.
    re.compile(r"eyJ[A-Za-z0-9_-]{2,}[A-Za-z0-9_.~+/=-]*(?:\.\.\.|…)?[A-Za-z0-9_.~+/=-]*"),
)


def redact(text: str) -> str:
    if "eyJ" not in text:  # every pattern needs one of these to match
        lowered = text.lower()
        if "token" not in lowered and "bearer" not in lowered:
            return text
    for pattern in _PATTERNS:
        text = pattern.sub(lambda m: m.group(1) + REDACTED if m.lastindex else REDACTED, text)
    return text


class RedactTokens(logging.Filter):
    """Redacts the message template and each string argument (formatters such as
    uvicorn's access formatter read ``record.args`` themselves)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.__dict__.get(REDACTED_ALREADY):
            return True
        record.__dict__[REDACTED_ALREADY] = True  # one pass per record, whatever filters
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.args, dict):
            args = record.args.items()
            record.args = {k: redact(v) if isinstance(v, str) else v for k, v in args}
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


def log_config(level: str = "info") -> dict[str, Any]:
    """uvicorn's logging config, plus our packages' loggers, with redaction on every handler."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["filters"] = {"redact": {"()": "gateway.logs.redaction_filter"}}
    config["formatters"]["default"]["()"] = "gateway.logs.LeanFormatter"
    for handler in config["handlers"].values():
        handler["filters"] = ["redact"]
    for name in ("gateway", "channels", "auth"):
        config["loggers"][name] = {
            "handlers": ["default"],
            "level": level.upper(),
            "propagate": False,
        }
    return config
