"""The redaction filter on its own: every shape a token takes in a log line, and the
lines without one left exactly as they were."""

from __future__ import annotations

import logging

import pytest

from gateway.logs import REDACTED, REDACTED_ALREADY, RedactTokens, redact

JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhIn0.c2lnbmF0dXJl"


@pytest.mark.parametrize(
    ("line", "secret"),
    [
        (f"GET /sse?channel=a&token={JWT} HTTP/1.1", JWT),
        ("GET /ws?TOKEN=opaque-secret-1 HTTP/1.1", "opaque-secret-1"),
        ("GET /x?access_token=opaque-secret-2", "opaque-secret-2"),
        ("GET /x?a=1;Token=opaque-secret-3", "opaque-secret-3"),
        ("Authorization: Bearer opaque-secret-4", "opaque-secret-4"),
        ("authorization: BEARER opaque-secret-5", "opaque-secret-5"),
        ('{"token": "opaque-secret-6"}', "opaque-secret-6"),
        ('{"access_token":"opaque-secret-7"}', "opaque-secret-7"),
        (f"frame {JWT[:20]}...{JWT[-6:]}", JWT[:20]),
        (f"bare {JWT} in text", JWT),
    ],
)
def test_every_shape_of_a_token_is_redacted(line: str, secret: str) -> None:
    out = redact(line)
    assert secret not in out
    assert REDACTED in out


@pytest.mark.parametrize(
    "line",
    [
        'GET /api/channels/prices/history?limit=5 HTTP/1.1" 200',
        '127.0.0.1:5000 - "WebSocket /ws" [accepted]',
        "tokens: 3 published, offsets 1-3",  # "token" without "=" and no credential
        "",
    ],
)
def test_lines_without_a_token_are_left_alone(line: str) -> None:
    assert redact(line) == line


def test_the_filter_redacts_the_template_and_every_string_argument() -> None:
    args = ("peer", f"GET /ws?token={JWT}", 101)
    record = logging.LogRecord("uvicorn", logging.INFO, __file__, 1, "%s - %s %d", args, None)
    record.msg = f"Bearer {JWT} " + record.msg
    assert RedactTokens().filter(record)
    assert record.getMessage() == f"Bearer {REDACTED} peer - GET /ws?token={REDACTED} 101"


def test_a_record_is_redacted_once_whatever_the_filters_it_passes() -> None:
    logger = logging.getLogger("tests.redaction")
    logger.propagate = False
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler = Keep()
    handler.addFilter(RedactTokens())
    logger.addFilter(RedactTokens())
    logger.addHandler(handler)
    try:
        logger.warning("GET %s", f"/sse?token={JWT}")
        # A caller that redacted its arguments itself says so; nothing is done twice.
        logger.warning("%s", f"/ws?token={REDACTED}", extra={REDACTED_ALREADY: True})
    finally:
        logger.removeHandler(handler)
    assert seen == [f"GET /sse?token={REDACTED}", f"/ws?token={REDACTED}"]
