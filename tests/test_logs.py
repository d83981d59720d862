"""The redaction filter on its own: every shape a token takes in a log line, and the
lines without one left exactly as they were."""

from __future__ import annotations

import logging
import random

import pytest
from uvicorn.logging import AccessFormatter
from websockets.frames import Frame, Opcode

from gateway.logs import REDACTED, REDACTED_ALREADY, LeanAccessFormatter, RedactTokens, redact
from tests.conftest import MakeServer, token
from tests.helpers import raw_ws_handshake, read_raw_frame

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
        # a name in percent-escapes is a token to the query parser: in the log line too
        ("GET /ws?%74oken=%65%79%4Aopaque-8&x=1 HTTP/1.1", "opaque-8"),
        ("GET /ws?a=1&t%6F%4Ben=opaque-9", "opaque-9"),
        ("GET /ws?access%5Ftoken=opaque-10", "opaque-10"),
        # the query string's repr in an ASGI scope (uvicorn's trace level), first in it: a
        # token that is not a JWT's usual ``eyJ`` (a space after its header's brace)
        ("{'query_string': b'token=ey7opaque-11&channel=a'}", "ey7opaque-11"),
        ("{'query_string': b'%74oken=opaque-12'}", "opaque-12"),
        ("{'token': 'opaque-13'}", "opaque-13"),  # a dict's repr
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
        "GET /sse?last_event_id=a%3A1%2Cb&channel=%61 HTTP/1.1",
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


def test_arguments_that_are_not_text_are_redacted_when_formatted() -> None:
    """uvicorn logs an ASGI scope (a dict) at its trace level, websockets a frame object
    at debug: formatted, as themselves, without the token (``%s`` and ``%r`` alike)."""
    scope = {"type": "websocket", "query_string": f"token={JWT}".encode()}

    class Frame:
        def __str__(self) -> str:
            return f'TEXT \'{{"op": "refresh", "token": "{JWT[:12]}...{JWT[-21:]}"}}\''

    args = (scope, Frame(), 7, None, 2.5)
    record = logging.LogRecord("uvicorn", 5, __file__, 1, "%s %s %d %s %.1f %r", args, None)
    record.args = (*args, scope)
    assert RedactTokens().filter(record)
    message = record.getMessage()
    assert JWT[:12] not in message and JWT[-21:] not in message, message
    assert message.startswith("{'type': 'websocket', 'query_string': b'token=[redacted]'}")
    assert message.endswith(" 7 None 2.5 " + redact(repr(scope)))


def test_websockets_frames_and_handshake_headers_keep_no_secret() -> None:
    """Under stock uvicorn, websockets logs each frame and each handshake header at
    debug. A frame logged as its head and tail lost the token's name and ``eyJ``
    ("note": "xx...<the signature's last 21 characters>") and a session cookie was
    written whole: now a frame is its kind and size, a header's value is shown only
    for the handshake's own headers."""
    from websockets.frames import Frame, Opcode

    payload = f'{{"id": 4, "op": "refresh", "note": "{"x" * 80}", "token": "{JWT}"}}'
    frame = Frame(Opcode.TEXT, payload.encode())
    assert JWT[-21:] in str(frame) and "eyJ" not in str(frame)  # what was logged
    lines = [
        ("< %s", (frame,)),
        ("> %s", (Frame(Opcode.CLOSE, b"\x03\xe8"),)),
        ("< %s: %s", ("Cookie", "session=SESSION-SECRET")),
        ("< %s: %s", ("X-Api-Key", "API-SECRET")),
        ("< %s: %s", ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")),
        ("< %s: %s", ("Host", "gateway.example.com")),
        ("< %s: %s", ("Authorization", f"Bearer {JWT}")),
    ]
    out = []
    for msg, args in lines:
        record = logging.LogRecord("uvicorn.error", logging.DEBUG, __file__, 1, msg, args, None)
        assert RedactTokens().filter(record)
        out.append(record.getMessage())
    assert out == [
        f"< TEXT [{len(payload)} bytes]",
        "> CLOSE [2 bytes]",
        f"< Cookie: {REDACTED}",
        f"< X-Api-Key: {REDACTED}",
        f"< Sec-WebSocket-Key: {REDACTED}",
        "< Host: gateway.example.com",
        f"< Authorization: {REDACTED}",
    ]


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


def test_no_token_survives_whatever_surrounds_it() -> None:
    """Randomised: a JWT, or a secret after ``token=``, ``Bearer`` or a JSON ``"token"``,
    amid pieces that look like the others' starts, is gone from the line."""
    rng = random.Random(7)
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1MSJ9.c2lnbmF0dXJlLXNlY3JldA"
    noise = ["token", "TOKEN", "Bear", "eyJ", '"', "'", "&", "?", ";", " ", "=", ":", "x=1", "…"]
    for _ in range(5000):
        secret = "s3cr3t" + str(rng.randrange(10**6))
        carriers = [
            f"?token={secret}",
            f"&ACCESS_TOKEN={secret}",
            f" Bearer {secret}",
            f'"token": "{secret}"',
            f"b'token={secret}",
            f"'token': '{secret}'",
            jwt,
            jwt[:24] + "...",
        ]
        carrier = rng.choice(carriers)
        parts = [rng.choice(noise) for _ in range(rng.randint(0, 6))]
        parts.insert(rng.randint(0, len(parts)), carrier)
        line = "".join(parts)
        redacted = redact(line)
        hidden = jwt[:24] if carrier.startswith("eyJ") else secret
        assert hidden not in redacted, (line, redacted)
        assert REDACTED in redacted


@pytest.mark.parametrize("status", [200, 101, 404, 503, 299])
def test_the_lean_access_formatter_writes_uvicorns_line(status: int) -> None:
    """Same text as uvicorn's ``AccessFormatter`` without colours, from the same record,
    which it leaves readable by every other handler."""
    fmt = '%(levelprefix)s %(client_addr)s - "%(request_line)s" %(status_code)s'
    args = ("203.0.113.9:5555", "GET", "/sse?channel=x&token=[redacted]", "1.1", status)
    theirs = AccessFormatter(fmt=fmt, use_colors=False)
    ours = LeanAccessFormatter(fmt=fmt, use_colors=False)

    def record() -> logging.LogRecord:
        template = '%s - "%s %s HTTP/%s" %d'
        return logging.LogRecord("uvicorn.access", logging.INFO, "x", 1, template, args, None)

    kept = record()
    assert ours.format(kept) == theirs.format(record())
    assert kept.getMessage() == record().getMessage()
    coloured = LeanAccessFormatter(fmt=fmt, use_colors=True)
    assert coloured.format(record()) == AccessFormatter(fmt=fmt, use_colors=True).format(record())


async def test_a_client_fault_uvicorn_logs_as_an_error_is_a_warning_without_traceback(
    make_server: MakeServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Under stock uvicorn, a text frame that is not UTF-8 was an ERROR with a traceback
    per connection (uvicorn closes it 1007): any client could fill the error log."""
    server = await make_server(raw_writes=False)
    with caplog.at_level(logging.INFO):
        reader, writer = await raw_ws_handshake(server.port, token())
        try:
            writer.write(Frame(Opcode.TEXT, b'{"op": "\xff"}').serialize(mask=True))
            close = await read_raw_frame(reader)
            assert close[0] == 0x88 and int.from_bytes(close[2:4], "big") == 1007, close
        finally:
            writer.close()
    faults = [r for r in caplog.records if "Invalid UTF-8" in r.getMessage()]
    assert [(r.levelname, r.exc_info) for r in faults] == [("WARNING", None)], caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
