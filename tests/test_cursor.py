"""SSE cursors: encode/decode round-trip (hypothesis) and rejection of garbage."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from channels.publication import StreamPosition
from gateway import cursor

channels = st.from_regex(r"[A-Za-z0-9_.:@-]{1,128}", fullmatch=True)
positions = st.builds(
    StreamPosition,
    offset=st.integers(0, 2**63 - 1),
    epoch=st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True),
)


@given(st.dictionaries(channels, positions, max_size=20))
def test_cursor_round_trips(value: dict[str, StreamPosition]) -> None:
    encoded = cursor.encode(value)
    assert "\n" not in encoded and "\r" not in encoded
    assert cursor.decode(encoded) == value


@given(st.text(max_size=300))
def test_decode_returns_positions_or_raises_value_error(text: str) -> None:
    try:
        decoded = cursor.decode(text)
    except ValueError:
        return
    assert cursor.decode(cursor.encode(decoded)) == decoded


@pytest.mark.parametrize(
    "bad",
    [
        "x",
        "a~b",
        "a~b~c",
        "a~b~-1",
        "a b~e~1",
        "a~e~1,",
        "a~e~1~2",
        "a~e f~1",
        "a~e~99999999999999999999",
        # 19 digits but past a signed 64-bit offset (the WebSocket's since refuses it too)
        f"a~e~{2**63}",
        "a~e~9999999999999999999",
    ],
)
def test_malformed_cursors_are_rejected(bad: str) -> None:
    with pytest.raises(ValueError):
        cursor.decode(bad)


def test_the_highest_offset_is_taken() -> None:
    assert cursor.decode(f"a~e~{2**63 - 1}") == {"a": StreamPosition(2**63 - 1, "e")}
