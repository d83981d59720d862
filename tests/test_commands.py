"""The WebSocket frame parser, by example and by property (hypothesis)."""

from __future__ import annotations

import contextlib
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from channels import names
from channels.names import CHANNEL_RE, VALID_KEPT, is_valid_channel
from channels.publication import StreamPosition
from gateway.commands import OPS, BadFrame, Command, parse_command

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
channels = st.from_regex(r"[A-Za-z0-9_.:@-]{1,128}", fullmatch=True)
ids = st.integers(-(2**63), 2**63 - 1) | st.text(max_size=16)


@given(id=ids, channel=channels, data=json_values)
def test_publish_round_trips_id_channel_and_data(id: Any, channel: str, data: Any) -> None:
    frame = orjson.dumps({"id": id, "op": "publish", "channel": channel, "data": data})
    command = parse_command(frame.decode())
    assert command == Command("publish", id, channel, data=orjson.dumps(data))


@given(
    id=ids,
    channel=channels,
    offset=st.integers(0, 2**63 - 1),
    epoch=st.text(max_size=10),
)
def test_subscribe_with_since_is_parsed(id: Any, channel: str, offset: int, epoch: str) -> None:
    frame = {
        "id": id,
        "op": "subscribe",
        "channel": channel,
        "since": {"offset": offset, "epoch": epoch},
    }
    command = parse_command(orjson.dumps(frame).decode())
    assert command.since == StreamPosition(offset, epoch)
    assert (command.op, command.id, command.channel) == ("subscribe", id, channel)


@given(value=json_values)
def test_any_json_value_is_parsed_or_rejected_with_bad_frame(value: Any) -> None:
    """Whatever the JSON, the parser never raises anything but BadFrame."""
    try:
        command = parse_command(orjson.dumps(value).decode())
    except BadFrame as exc:
        assert exc.message
    else:
        assert isinstance(value, dict) and command.op in OPS


@given(text=st.text(max_size=200))
def test_arbitrary_text_never_crashes_the_parser(text: str) -> None:
    with contextlib.suppress(BadFrame):
        parse_command(text)


@given(names=st.lists(st.text(alphabet="ab:_-. é\n", max_size=130), min_size=1, max_size=50))
def test_channel_names_are_judged_by_the_expression_whatever_was_asked_before(
    names: list[str],
) -> None:
    """Valid names are remembered (a set instead of the expression at every connect):
    asked again, in any order, each name still gets the expression's answer."""
    for name in [*names, *reversed(names), *names]:
        assert is_valid_channel(name) is (CHANNEL_RE.fullmatch(name) is not None), name


def test_the_names_remembered_are_bounded() -> None:
    for n in range(2 * VALID_KEPT + 10):
        assert is_valid_channel(f"c{n}")
        assert is_valid_channel(f"c{n}") and not is_valid_channel(f"c{n} ")
    assert 0 < len(names._VALID) <= VALID_KEPT
    assert is_valid_channel("c0") and not is_valid_channel(7) and not is_valid_channel("")


@given(channel=st.text(max_size=140).filter(lambda c: not is_valid_channel(c)))
def test_invalid_channel_names_are_rejected_but_not_counted(channel: str) -> None:
    frame = orjson.dumps({"id": 7, "op": "subscribe", "channel": channel}).decode()
    with pytest.raises(BadFrame) as info:
        parse_command(frame)
    assert info.value.id == 7
    assert info.value.malformed is False


@pytest.mark.parametrize(
    ("frame", "id"),
    [
        ("{not json", None),
        ("[1, 2]", None),
        ('"subscribe"', None),
        ("42", None),
        ('{"id": 1}', 1),
        ('{"id": 1, "op": "dance"}', 1),
        ('{"id": 1, "op": 5}', 1),
        ('{"id": 1.5, "op": "ping"}', None),
        ('{"id": true, "op": "ping"}', None),
        ('{"id": {}, "op": "ping"}', None),
        ('{"id": 2, "op": "subscribe"}', 2),
        ('{"id": 2, "op": "subscribe", "channel": 5}', 2),
        ('{"id": 3, "op": "subscribe", "channel": "a", "since": 5}', 3),
        ('{"id": 3, "op": "subscribe", "channel": "a", "since": {"offset": -1, "epoch": "e"}}', 3),
        ('{"id": 3, "op": "subscribe", "channel": "a", "since": {"offset": "1", "epoch": "e"}}', 3),
        ('{"id": 3, "op": "subscribe", "channel": "a", "since": {"offset": 1, "epoch": 1}}', 3),
        ('{"id": "x", "op": "publish", "channel": "a"}', "x"),
        ('{"id": 4, "op": "history", "channel": "a", "limit": "10"}', 4),
        ('{"id": 4, "op": "history", "channel": "a", "limit": -1}', 4),
        ('{"id": 4, "op": "history", "channel": "a", "limit": true}', 4),
        ('{"id": 5, "op": "refresh"}', 5),
        ('{"id": 5, "op": "refresh", "token": 12}', 5),
    ],
)
def test_malformed_frames_are_counted_and_keep_their_id(frame: str, id: Any) -> None:
    with pytest.raises(BadFrame) as info:
        parse_command(frame)
    assert info.value.malformed is True
    assert info.value.id == id


def test_command_without_id_is_accepted() -> None:
    assert parse_command('{"op": "ping"}') == Command("ping", None)
